//! `portcullis serve`: wire the core, the adapters and the listeners together, run
//! until SIGTERM, then drain.

use crate::admin::{self, AdminState, AuditSink, Reloader};
use crate::descriptors;
use crate::observability::{self, Health};
use crate::pki::{self, PkiPaths};
use crate::usage::UsageError;
use anyhow::{Context, Result};
use portcullis_config::{BrokerMode, Config};
use portcullis_core::audit::{Audit, AuditEntry, AuditSettings, Checkpoint, load_or_create_key};
use portcullis_core::auth::{Authenticator, Policies};
use portcullis_core::backoff::BackoffPolicy;
use portcullis_core::control::ControlKey;
use portcullis_core::forward::Forwarder;
use portcullis_core::limit::{GlobalBucket, Rate};
use portcullis_core::mailbox::MailboxLimits;
use portcullis_core::message::{Message, QoS};
use portcullis_core::metrics::Metrics;
use portcullis_core::principal::PrincipalKind;
use portcullis_core::quarantine::{self, Behaviours};
use portcullis_core::record::RecordSealer;
use portcullis_core::retained::RetainedCommands;
use portcullis_core::secret::SecretHasher;
use portcullis_core::session_file::{Journal, SessionFile, Table};
use portcullis_core::sessions::{KickReason, Sessions};
use portcullis_core::source_gate::ConnectionLimits;
use portcullis_core::topic::{TopicLimits, TopicName};
use portcullis_core::validate::Validator;
use portcullis_embedded::EmbeddedBroker;
use portcullis_mqtt::listener;
use portcullis_mqtt::session::{Context as SessionContext, Live, SessionLimits};
use portcullis_mqtt::state::SessionStore;
use portcullis_upstream::outbox::OutboxAdmin;
use portcullis_upstream::{ControlLink, UpstreamForwarder};
use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

/// Control messages from other replicas waiting to be checked, at most.
const CONTROL_QUEUE: usize = 1024;

pub fn run(config: Config, path: Option<std::path::PathBuf>) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("portcullis")
        .build()
        .context("starting the runtime")?;
    runtime.block_on(serve(config, path))
}

async fn bind(addr: Option<SocketAddr>, what: &str) -> Result<Option<TcpListener>> {
    match addr {
        None => Ok(None),
        Some(a) => TcpListener::bind(a)
            .await
            .map(Some)
            .with_context(|| format!("{what}: cannot listen on {a}")),
    }
}

async fn serve(config: Config, path: Option<std::path::PathBuf>) -> Result<()> {
    let embedded_default = path.is_none();
    // Installed first, so a SIGTERM during start-up is a clean stop too.
    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    for renamed in &config.renamed {
        tracing::warn!("configuration: {renamed}");
    }
    let data_dir = &config.data_dir;
    // Owner-only: the registry, keys and audit log live here.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)
        .with_context(|| format!("data dir {}", data_dir.display()))?;

    // A development PKI when the server certificate is left at its default place.
    let pki_paths = PkiPaths::new(data_dir.join("pki"));
    let uses_dev_pki = config.tls.cert.is_none() && config.tls.key.is_none();
    if uses_dev_pki && pki::ensure_dev_pki(&pki_paths)? {
        eprintln!(
            "WARNING: created a DEVELOPMENT PKI in {} (CA key on this disk).\n\
             WARNING: it is for trying Portcullis only; configure [tls] and group CAs for production.",
            pki_paths.dir.display()
        );
    }

    let hasher = SecretHasher::load_or_create(&config.secret_key_file())?;
    let master = Arc::new(crate::registry_file::master_keys(&config)?);
    let policies = Arc::new(Policies::from_config(&config).map_err(|e| UsageError(e.to_string()))?);
    let metrics = Arc::new(Metrics::default());
    let audit_key = load_or_create_key(&config.audit_key_file())
        .with_context(|| format!("audit key {}", config.audit_key_file().display()))?;
    // Registry records are sealed under a key derived from the audit key, which lives
    // outside the data dir.
    let registry = Arc::new(crate::registry_file::open_registry(
        &config,
        RecordSealer::derive(&audit_key),
    )?);
    let audit_settings = AuditSettings {
        path: config.audit_file(),
        queue: config.audit.queue,
        key: audit_key,
        max_file_bytes: config.audit.max_file_bytes,
        keep_files: config.audit.keep_files,
        aggregate_window: *config.audit.aggregate_window,
        checkpoint_interval: *config.audit.checkpoint_interval,
    };
    let (checkpoint_tx, mut checkpoint_rx) = tokio::sync::mpsc::channel::<Checkpoint>(16);
    let (audit, audit_writer) = Audit::start(audit_settings, metrics.clone(), Some(checkpoint_tx))
        .await
        .with_context(|| format!("audit log {}", config.audit_file().display()))?;
    let retained = Arc::new(
        RetainedCommands::new(config.sessions.max_retained_per_device)
            .with_byte_limits(
                config.sessions.max_retained_command_bytes_per_device,
                config.sessions.max_retained_command_bytes,
            )
            .with_telemetry_bytes_per_device(
                config.sessions.max_retained_telemetry_bytes_per_device,
            ),
    );
    // Parked device sessions and retained commands come back from the session file.
    let session_file = Arc::new(
        SessionFile::open(&config.sessions_file(), RecordSealer::derive(&audit_key))
            .map_err(|e| UsageError(e.to_string()))?,
    );
    let kept_sessions = session_file
        .load(Table::Sessions)
        .map_err(|e| UsageError(e.to_string()))?;
    let kept_retained = session_file
        .load(Table::Retained)
        .map_err(|e| UsageError(e.to_string()))?;
    let journal = Journal::start(session_file, metrics.clone());
    retained.keep_in(journal.clone());
    let retained_dropped = retained.restore(kept_retained, |id| {
        registry.snapshot().get(PrincipalKind::Device, id).is_some()
    });
    let upstream = config.broker.mode == BrokerMode::Upstream;
    // Replicas: quarantines, releases and bans told to the others, and taken from them.
    let (control_link, control_out, control_in) = match config
        .upstream_path(&config.upstream.control_key_file)
        .filter(|_| upstream)
    {
        None => (None, None, None),
        Some(path) => {
            let secret = std::fs::read(&path).map_err(|e| {
                UsageError(format!("upstream.control_key_file {}: {e}", path.display()))
            })?;
            let key = ControlKey::derive(secret.trim_ascii()).map_err(|e| {
                UsageError(format!("upstream.control_key_file {}: {e}", path.display()))
            })?;
            let (out_tx, out_rx) = tokio::sync::mpsc::unbounded_channel();
            // Bounded: a flood of control messages is dropped (and counted), not queued.
            let (in_tx, in_rx) = tokio::sync::mpsc::channel(CONTROL_QUEUE);
            let link = ControlLink {
                key: key.clone(),
                outgoing: out_rx,
                incoming: in_tx,
            };
            (Some(link), Some(out_tx), Some((key, in_rx)))
        }
    };
    let (forwarder, outbox): (Arc<dyn Forwarder>, _) = if upstream {
        let f = UpstreamForwarder::start(
            &config,
            &audit_key,
            retained.clone(),
            control_link,
            metrics.clone(),
            audit.clone(),
        )
        .await
        .map_err(|e| UsageError(e.to_string()))?;
        let outbox = Arc::new(OutboxAdmin::live(f.outbox()));
        (f, Some(outbox))
    } else {
        let f = EmbeddedBroker::start(&config.broker, metrics.clone(), audit.clone()).await?;
        (f, None)
    };
    // Checkpoints are forwarded, so a copy of the chain's state lives off this disk.
    {
        let uplink = forwarder.events();
        tokio::spawn(async move {
            while let Some(checkpoint) = checkpoint_rx.recv().await {
                let Ok(payload) = serde_json::to_vec(&checkpoint) else {
                    continue;
                };
                let Ok(topic) = TopicName::parse_unlimited("portcullis/events/audit") else {
                    continue;
                };
                let _ = uplink
                    .send(Message {
                        topic,
                        payload: payload.into(),
                        qos: QoS::AtMostOnce,
                        retain: true,
                        properties: None,
                    })
                    .await;
            }
        });
    }
    let sessions = Sessions::new();
    // Behaviour models and quarantine: kept states come back as they were.
    let (behaviours, behaviour_changes) =
        Behaviours::load(&registry, quarantine::Policies::from_config(&config))
            .context("behaviour records")?;
    // `portcullis_devices{state}` on /metrics, counted at each scrape.
    metrics.set_device_census(Arc::new(portcullis_core::device_census::DeviceStates::new(
        registry.clone(),
        behaviours.clone(),
    )));
    let auth = Arc::new(Authenticator::new(
        registry.clone(),
        hasher.clone(),
        policies.clone(),
        BackoffPolicy::from_config(&config.auth),
    ));
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let limits = SessionLimits {
        max_packet_size: config.limits.max_packet_size,
        topic: TopicLimits {
            max_length: config.limits.max_topic_length,
            max_depth: config.limits.max_topic_depth,
        },
        connect_timeout: *config.limits.connect_timeout,
        max_subscribe_filters: config.limits.max_subscribe_filters,
        write_timeout: *config.limits.write_timeout,
        max_session_expiry: config.sessions.max_session_expiry.as_secs() as u32,
        mailbox: MailboxLimits {
            max_messages: config.sessions.queue_max_messages,
            max_bytes: config.sessions.queue_max_bytes,
            max_age: *config.sessions.queue_max_age,
        },
        service_mailbox: MailboxLimits {
            max_messages: config.sessions.service_queue_max_messages,
            max_bytes: config.sessions.service_queue_max_bytes,
            max_age: *config.sessions.queue_max_age,
        },
        max_inflight: config.sessions.max_inflight,
        receive_maximum: config.sessions.receive_maximum,
        topic_alias_maximum: config.sessions.topic_alias_maximum,
        max_keep_alive: config
            .sessions
            .max_keep_alive
            .as_secs()
            .min(u64::from(u16::MAX)) as u16,
        max_user_properties: config.sessions.max_user_properties,
        max_subscriptions: config.sessions.max_subscriptions,
        subscribe_rate: Rate {
            per_second: config.limits.subscribe_rate,
            burst: config.limits.subscribe_burst,
        },
    };
    // Devices and services are separate namespaces: a session slot each. Device
    // sessions are kept on disk (services' live with the broker they subscribe to).
    let device_store = SessionStore::with_journal(journal.clone());
    let service_store = SessionStore::new();
    {
        let registry = registry.clone();
        let mailbox = limits.mailbox;
        let (restored, dropped) = device_store.restore(
            kept_sessions,
            *config.sessions.max_session_expiry,
            || Arc::new(portcullis_core::mailbox::Mailbox::new(mailbox)),
            |id| {
                registry
                    .snapshot()
                    .get(PrincipalKind::Device, id)
                    .map(|r| r.created_unix)
            },
        );
        for (id, mailbox) in &restored {
            forwarder
                .register_device(id.clone(), mailbox.clone())
                .await?;
        }
        let dropped = dropped + retained_dropped;
        metrics
            .sessions_restored
            .store(restored.len() as u64, Ordering::Relaxed);
        metrics
            .session_records_dropped
            .store(dropped, Ordering::Relaxed);
        if !restored.is_empty() || dropped > 0 {
            audit.record(AuditEntry::new("sessions", "allow").reason(format!(
                "{} parked device sessions restored, {dropped} kept records dropped (damaged, expired or no longer registered)",
                restored.len()
            )));
        }
    }
    let validator = Arc::new(
        Validator::new(&config.validation, |p| config.resolve(p))
            .map_err(|e| UsageError(e.to_string()))?,
    );
    let (live_tx, live_rx) = watch::channel(Arc::new(Live {
        config: Arc::new(config.clone()),
        validator: validator.clone(),
    }));
    let global = Arc::new(GlobalBucket::new(
        config.rate_limits.global_messages_per_second,
        std::time::Instant::now(),
    ));
    // What every admission shares, MQTT's and CoAP's.
    let shared = Arc::new(portcullis_core::admission::Shared {
        global: global.clone(),
        retained: retained.clone(),
        behaviours: behaviours.clone(),
        directory: auth.clone(),
        metrics: metrics.clone(),
        audit: audit.clone(),
    });
    let context = |kind| {
        let store = match kind {
            PrincipalKind::Device => device_store.clone(),
            PrincipalKind::Service => service_store.clone(),
        };
        Arc::new(SessionContext {
            kind,
            live: live_rx.clone(),
            global: global.clone(),
            auth: auth.clone(),
            forwarder: forwarder.clone(),
            sessions: sessions.clone(),
            store,
            retained: retained.clone(),
            behaviours: behaviours.clone(),
            shared: shared.clone(),
            audit: audit.clone(),
            metrics: metrics.clone(),
            limits,
            shutdown: shutdown_rx.clone(),
        })
    };
    let device_ctx = context(PrincipalKind::Device);
    let service_ctx = context(PrincipalKind::Service);
    let coap_ctx = Arc::new(portcullis_coap::session::Context {
        live: live_rx.clone(),
        global: global.clone(),
        auth: auth.clone(),
        forwarder: forwarder.clone(),
        sessions: sessions.clone(),
        parked: portcullis_core::parking::ParkedSessions::new(),
        retained: retained.clone(),
        behaviours: behaviours.clone(),
        shared: shared.clone(),
        audit: audit.clone(),
        metrics: metrics.clone(),
        limits: portcullis_coap::session::Limits {
            topic: limits.topic,
            mailbox: limits.mailbox,
            max_body_size: config.coap.max_body_size,
            session_expiry: *config.coap.session_expiry,
            max_ttd: *config.coap.max_ttd,
            dedup_entries: config.coap.dedup_entries,
            ack_timeout: *config.coap.ack_timeout,
        },
        shutdown: shutdown_rx.clone(),
    });

    let l = &config.listeners;
    let device_tls = bind(l.device_tls, "device TLS listener").await?;
    let device_plain = bind(l.device_plain, "device plain listener").await?;
    // In upstream mode services connect to the broker cluster.
    let (service_tls, service_plain) = if upstream {
        (None, None)
    } else {
        (
            bind(l.service_tls, "service TLS listener").await?,
            bind(l.service_plain, "service plain listener").await?,
        )
    };
    let observability_listener = bind(config.observability.listen, "observability").await?;
    let admin_socket = config.admin_socket();
    let admin_listener = admin::bind(&admin_socket)
        .with_context(|| format!("admin socket {}", admin_socket.display()))?;
    // The admin API over HTTP (off by default): token, certificate and port now.
    let admin_http = admin::http::bind(&config).await?;

    let server_cert = config.server_cert();
    let server_key = config.server_key();
    let handshake_timeout = *config.tls.handshake_timeout;
    // Descriptors: as many as allowed, and connections capped below them.
    let nofile = descriptors::raise_nofile_limit();
    let http_listeners =
        usize::from(observability_listener.is_some()) + usize::from(admin_http.is_some());
    let caps = descriptors::connection_caps(
        nofile.soft,
        config.limits.fd_reserve,
        config.limits.max_connections,
        config.limits.max_unauthenticated,
        http_listeners,
    )
    .map_err(UsageError)?;
    match (&nofile.error, nofile.raised_from) {
        (Some(e), _) => {
            tracing::warn!(soft = nofile.soft, error = %e, "could not raise the file descriptor limit")
        }
        (None, Some(from)) => {
            tracing::info!(from, to = nofile.soft, "file descriptor limit raised")
        }
        (None, None) => tracing::info!(limit = nofile.soft, "file descriptor limit"),
    }
    tracing::info!(
        connections = caps.total,
        unauthenticated = caps.unauthenticated,
        http_per_listener = caps.http,
        reserve = config.limits.fd_reserve,
        "connection caps"
    );
    let conn_limits = ConnectionLimits::new(
        caps.total,
        caps.unauthenticated,
        config.limits.max_connections_per_source,
        Rate {
            per_second: config.rate_limits.connections_per_second_per_source,
            burst: config.rate_limits.connection_burst_per_source,
        },
        config.auth.ipv6_source_prefix,
    );
    let acceptor = |roots| {
        listener::tls_acceptor(&server_cert, &server_key, roots)
            .map_err(|e| UsageError(e.to_string()))
    };
    let (device_tls_tx, device_tls_rx) = watch::channel(acceptor(policies.device_roots.clone())?);
    let (service_tls_tx, service_tls_rx) =
        watch::channel(acceptor(policies.service_roots.clone())?);
    let mut tasks = Vec::new();
    let mut report = Vec::new();
    // PROXY protocol v2 from the load balancers in front of the device listeners.
    let balancers = |nets| {
        portcullis_core::proxy_header::LoadBalancers::new(
            nets,
            *config.proxy_protocol.header_timeout,
            caps.unauthenticated,
        )
        .map(Arc::new)
    };
    for (listener, ctx, tls, label, proxy) in [
        (
            device_tls,
            &device_ctx,
            Some(device_tls_rx),
            "device listener (MQTT over TLS)",
            balancers(config.proxy_protocol.device_tls_balancers()),
        ),
        (
            device_plain,
            &device_ctx,
            None,
            "device listener (plain MQTT)",
            balancers(config.proxy_protocol.device_plain_balancers()),
        ),
        (
            service_tls,
            &service_ctx,
            Some(service_tls_rx),
            "service listener (MQTT over TLS)",
            None,
        ),
        (
            service_plain,
            &service_ctx,
            None,
            "service listener (plain MQTT)",
            None,
        ),
    ] {
        let Some(listener) = listener else { continue };
        report.push((label, listener.local_addr()?.to_string()));
        if proxy.is_some() {
            tracing::info!(
                listener = label,
                "PROXY protocol v2 from the listed load balancers"
            );
        }
        tasks.push(tokio::spawn(listener::serve_behind(
            listener,
            tls,
            handshake_timeout,
            ctx.clone(),
            conn_limits.clone(),
            proxy,
            shutdown_rx.clone(),
        )));
    }
    let coap_gate = portcullis_core::source_gate::SourceGate {
        limits: conn_limits.clone(),
        auth: auth.clone(),
        metrics: metrics.clone(),
        audit: audit.clone(),
    };
    let coap = crate::coap::start(
        &config,
        registry.clone(),
        master.clone(),
        coap_gate,
        coap_ctx,
    )
    .await?;
    if let Some(c) = &coap {
        if let Some(local) = c.local {
            report.push(("device listener (CoAP over DTLS, UDP)", local.to_string()));
        }
        if let Some(local) = c.plain {
            report.push((
                "device listener (plain CoAP, UDP, loopback)",
                local.to_string(),
            ));
        }
    }
    let serial = match crate::serial::open_store(&config)? {
        None => None,
        Some(store) => {
            let ctx = Arc::new(portcullis_serial::bus::Context {
                live: live_rx.clone(),
                auth: auth.clone(),
                forwarder: forwarder.clone(),
                sessions: sessions.clone(),
                parked: portcullis_core::parking::ParkedSessions::new(),
                retained: retained.clone(),
                behaviours: behaviours.clone(),
                shared: shared.clone(),
                audit: audit.clone(),
                metrics: metrics.clone(),
                limits: portcullis_serial::bus::Limits {
                    topic: limits.topic,
                    mailbox: limits.mailbox,
                    session_expiry: *config.sessions.max_session_expiry,
                    ack_timeout: *config.serial.ack_timeout,
                    max_retransmits: config.serial.max_retransmits,
                    resync_interval: *config.serial.resync_interval,
                    max_frames_per_second: config.serial.max_frames_per_second,
                    counter_reserve: config.serial.counter_reserve,
                },
                shutdown: shutdown_rx.clone(),
                keys: Arc::new(portcullis_serial::keys::RegistryKeys::new(
                    registry.clone(),
                    master.clone(),
                )),
                store,
            });
            Some(crate::serial::start(&config, ctx)?)
        }
    };
    let serial_parked = serial.as_ref().map(|s| s.parked.clone());
    if let Some(s) = serial {
        for path in s.paths {
            report.push(("serial port", path));
        }
        tasks.extend(s.tasks);
    }
    report.push(("admin socket", admin_socket.display().to_string()));
    // Reload: build everything new first; swap only if all of it loads.
    // Each caller audits the reload it asked for (the signal here, the admin API in
    // its handler, with the caller's address).
    let reloader: Reloader = {
        let running = std::sync::Mutex::new(config.clone());
        let (auth, behaviours) = (auth.clone(), behaviours.clone());
        let path = path.clone();
        let swaps = Swaps {
            live: live_tx,
            device_tls: device_tls_tx,
            service_tls: service_tls_tx,
            admin_http: admin_http.as_ref().map(|b| b.rekey.clone()),
        };
        Arc::new(move || reload(path.as_deref(), &running, &auth, &behaviours, &swaps))
    };
    let admin_state = Arc::new(AdminState {
        registry: registry.clone(),
        hasher,
        master: master.clone(),
        policies: policies.clone(),
        auth: Some(auth.clone()),
        reload: Some(reloader.clone()),
        sessions: Some(sessions.clone()),
        retained: Some(retained.clone()),
        behaviours: Some(behaviours.clone()),
        outbox,
        control: control_out.clone(),
        audit: AuditSink::Live(audit.clone(), config.audit_file()),
        caller: None,
    });
    // What other replicas tell this one is applied as an operator's change here would
    // be, but not told on again.
    if let Some((key, incoming)) = control_in {
        let state = AdminState {
            reload: None,
            control: None,
            ..(*admin_state).clone()
        };
        let me = config.upstream.client_id.clone().unwrap_or_default();
        tokio::spawn(crate::replicas::take(
            key,
            me,
            incoming,
            state,
            metrics.clone(),
        ));
    }
    // Transitions are persisted, audited and published by one task; time-outs
    // (quarantine TTL, end of probation and watch) are applied each second.
    let (behaviour_stop, behaviour_stopped) = tokio::sync::oneshot::channel();
    let behaviour_task = tokio::spawn(quarantine::run(
        behaviours.clone(),
        behaviour_changes,
        quarantine::Effects {
            registry: registry.clone(),
            forwarder: forwarder.clone(),
            retained: retained.clone(),
            audit: audit.clone(),
            metrics: metrics.clone(),
            control: control_out,
        },
        behaviour_stopped,
    ));
    let outbox = admin_state.outbox.clone();
    if let Some(bound) = admin_http {
        report.push((bound.label(), bound.local.to_string()));
        tasks.push(tokio::spawn(admin::http::serve(
            bound,
            caps.http,
            admin_state.clone(),
            metrics.clone(),
            shutdown_rx.clone(),
        )));
    }
    let admin_task = tokio::spawn(admin::serve(admin_listener, admin_state));
    // Parked sessions past their expiry are dropped, and what they held with them
    // (counted as expired): a device's queued commands, a service's queued messages
    // and its subscriptions.
    let sweeper = {
        let (forwarder, behaviours, metrics) =
            (forwarder.clone(), behaviours.clone(), metrics.clone());
        let (devices, services) = (device_store.clone(), service_store.clone());
        let coap = coap.as_ref().map(|c| (c.parked.clone(), c.stats.clone()));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let now = std::time::Instant::now();
                behaviours.sweep(now);
                for (id, mailbox) in devices.expire(now) {
                    let dropped = mailbox.clear() as u64;
                    metrics.queue_expired.fetch_add(dropped, Ordering::Relaxed);
                    forwarder.unregister_device(id, mailbox).await;
                }
                for (id, mailbox) in services.expire(now) {
                    let dropped = mailbox.clear() as u64;
                    metrics.queue_expired.fetch_add(dropped, Ordering::Relaxed);
                    forwarder.detach_service(id, mailbox).await;
                }
                if let Some(parked) = &serial_parked {
                    for (id, mailbox) in parked.expire(now) {
                        let dropped = mailbox.clear() as u64;
                        metrics.queue_expired.fetch_add(dropped, Ordering::Relaxed);
                        forwarder.unregister_device(id, mailbox).await;
                    }
                }
                if let Some((parked, stats)) = &coap {
                    for (id, mailbox) in parked.expire(now) {
                        let dropped = mailbox.clear() as u64;
                        metrics.queue_expired.fetch_add(dropped, Ordering::Relaxed);
                        forwarder.unregister_device(id, mailbox).await;
                    }
                    crate::coap::publish_stats(stats, &metrics);
                }
            }
        })
    };
    let ready = Arc::new(AtomicBool::new(false));
    if let Some(listener) = observability_listener {
        report.push((
            "observability (/healthz /readyz /metrics)",
            listener.local_addr()?.to_string(),
        ));
        let app = observability::router(Health {
            ready: ready.clone(),
            metrics: metrics.clone(),
        });
        tasks.push(tokio::spawn(crate::http_listener::serve(
            listener,
            None,
            app,
            crate::http_listener::Bounds::new(
                caps.http,
                handshake_timeout,
                config.auth.ipv6_source_prefix,
            ),
            "observability",
            shutdown_rx.clone(),
        )));
    }
    if uses_dev_pki {
        report.push(("development CA", pki_paths.ca_cert().display().to_string()));
    }

    // Everything is bound and serving: ready before the banner announces it.
    ready.store(true, Ordering::Relaxed);
    let forwarding = if upstream {
        let urls: Vec<String> = config.upstream.urls.iter().map(|u| u.to_string()).collect();
        report.push(("outbox", config.outbox_file().display().to_string()));
        format!("upstream {}", urls.join(", "))
    } else {
        "embedded broker".to_string()
    };
    println!(
        "portcullis {} serving{} ({forwarding}, data in {})",
        env!("CARGO_PKG_VERSION"),
        if embedded_default {
            " on its embedded default"
        } else {
            ""
        },
        data_dir.display()
    );
    if upstream {
        println!("  services: connect to the upstream cluster (no service listener here)");
    }
    for (label, value) in &report {
        println!("  {label}: {value}");
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    audit.record(AuditEntry::new("start", "allow").reason("gateway started"));

    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = sighup.recv() => {
                let reload = reloader.clone();
                match tokio::task::spawn_blocking(move || reload()).await {
                    Ok(result) => {
                        audit.record(admin::reload_audit(&result).protocol("signal"));
                        match result {
                            Ok(summary) => tracing::info!(%summary, "configuration reloaded"),
                            Err(why) => tracing::error!(%why, "configuration reload refused; the running one stays"),
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "configuration reload failed"),
                }
            }
        }
    }

    // Drain: stop accepting, tell every peer we are going, wait for them to close.
    tracing::info!("shutting down");
    ready.store(false, Ordering::Relaxed);
    let _ = shutdown_tx.send(true);
    sessions.kick_all(KickReason::Shutdown);
    let deadline = tokio::time::Instant::now() + *config.limits.drain_timeout;
    while !sessions.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    admin_task.abort();
    sweeper.abort();
    // The CoAP layer stops with its sessions (a device that comes back handshakes).
    if let Some(c) = &coap {
        for task in &c.tasks {
            task.abort();
        }
    }
    // What transitions are still queued are persisted before the registry closes.
    let _ = behaviour_stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(2), behaviour_task).await;
    // Parked sessions (every session the drain parked included) are on disk.
    let _ = tokio::time::timeout(Duration::from_secs(5), journal.flush()).await;
    // And what the upstream broker acknowledged, so that it is not sent again.
    if let Some(outbox) = &outbox
        && tokio::time::timeout(Duration::from_secs(5), outbox.close())
            .await
            .is_err()
    {
        tracing::warn!(
            "the outbox did not record what the broker acknowledged within 5 s: \
             a restart may send some of it again"
        );
    }
    let _ = std::fs::remove_file(&admin_socket);
    // The listeners' tasks get a second to finish what they answer; then they are
    // ended (not left running past the audit's last line).
    for mut t in tasks {
        if tokio::time::timeout(Duration::from_secs(1), &mut t)
            .await
            .is_err()
        {
            t.abort();
            let _ = t.await;
        }
    }
    audit.record(AuditEntry::new("stop", "allow").reason("gateway stopped"));
    drop(audit);
    drop(device_ctx);
    drop(service_ctx);
    let _ = tokio::time::timeout(Duration::from_secs(2), audit_writer.finish()).await;
    // The registry commits every change as it happens; dropping it releases the lock.
    drop(registry);
    println!("portcullis stopped");
    Ok(())
}

/// Where a reload puts what it built.
struct Swaps {
    live: watch::Sender<Arc<Live>>,
    device_tls: watch::Sender<tokio_rustls::TlsAcceptor>,
    service_tls: watch::Sender<tokio_rustls::TlsAcceptor>,
    admin_http: Option<Arc<crate::admin::http::Rekey>>,
}

/// Re-read the configuration and apply what can change while running: ACLs, CAs and
/// CRLs, the server certificate (the admin API's too, and its token), rate limits and
/// payload rules. Everything is built
/// before anything is swapped, so a bad file leaves the running configuration alone.
fn reload(
    path: Option<&std::path::Path>,
    running: &std::sync::Mutex<Config>,
    auth: &Authenticator,
    behaviours: &Behaviours,
    swaps: &Swaps,
) -> Result<String, String> {
    let new = match path {
        Some(p) => Config::load(p).map_err(|e| e.to_string())?,
        None => Config::default(),
    };
    let mut current = running.lock().unwrap_or_else(|p| p.into_inner());
    // What listeners, storage and the broker were built from needs a restart.
    for (key, same) in [
        ("data_dir", new.data_dir == current.data_dir),
        ("listeners", new.listeners == current.listeners),
        ("observability", new.observability == current.observability),
        ("admin", new.admin == current.admin),
        ("broker", new.broker == current.broker),
        ("audit", new.audit == current.audit),
        ("sessions", new.sessions == current.sessions),
        ("limits", new.limits == current.limits),
        ("auth", new.auth == current.auth),
        ("coap", new.coap == current.coap),
        ("serial", new.serial == current.serial),
        (
            "proxy_protocol",
            new.proxy_protocol == current.proxy_protocol,
        ),
        // Built once at start (shared lock-free by all sessions and listeners).
        (
            "rate_limits.global_messages_per_second",
            new.rate_limits.global_messages_per_second
                == current.rate_limits.global_messages_per_second,
        ),
        (
            "rate_limits.connections_per_second_per_source",
            new.rate_limits.connections_per_second_per_source
                == current.rate_limits.connections_per_second_per_source
                && new.rate_limits.connection_burst_per_source
                    == current.rate_limits.connection_burst_per_source,
        ),
    ] {
        if !same {
            return Err(format!("{key} changed: that needs a restart"));
        }
    }
    let policies = Arc::new(Policies::from_config(&new).map_err(|e| e.to_string())?);
    let validator =
        Arc::new(Validator::new(&new.validation, |p| new.resolve(p)).map_err(|e| e.to_string())?);
    let (cert, key) = (new.server_cert(), new.server_key());
    let device = listener::tls_acceptor(&cert, &key, policies.device_roots.clone())
        .map_err(|e| e.to_string())?;
    let service = listener::tls_acceptor(&cert, &key, policies.service_roots.clone())
        .map_err(|e| e.to_string())?;
    // The admin API's token file and certificate, read again.
    let admin_keys = match &swaps.admin_http {
        Some(_) => crate::admin::http::keys(&new)?,
        None => None,
    };
    // All of it loaded: swap (behaviour settings before the sessions hear of it).
    auth.set_policies(policies);
    behaviours.set_policies(quarantine::Policies::from_config(&new));
    swaps.device_tls.send_replace(device);
    swaps.service_tls.send_replace(service);
    if let (Some(rekey), Some(keys)) = (&swaps.admin_http, admin_keys) {
        rekey.send(keys);
    }
    swaps.live.send_replace(Arc::new(Live {
        config: Arc::new(new.clone()),
        validator,
    }));
    let groups = new.device_groups.len() + new.service_groups.len();
    *current = new;
    Ok(format!("{groups} groups, rules and certificates in force"))
}
