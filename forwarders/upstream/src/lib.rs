//! The upstream forwarder: clean traffic goes to an external broker cluster (EMQX,
//! HiveMQ, VerneMQ, Mosquitto) through a durable outbox. It implements the core's
//! `Forwarder` seam (`portcullis_core::forward`), like the embedded broker.
//!
//! - `outbox`: every message is committed to disk (redb, group commit from one writer)
//!   before its QoS 1/2 sender is acknowledged; an entry goes only when the broker
//!   acknowledged it, expired, or went to the dead letters.
//! - `link`: one MQTT 5 connection at a time (our client loop, rumqttc's packet codec), sending the outbox in order
//!   and subscribing to the device command topics, which it routes to the devices'
//!   mailboxes here.
//!
//! Services connect to the cluster, not to Portcullis: the service calls of the seam
//! are refused.

pub mod entry;
pub mod link;
pub mod outbox;
pub mod store;
pub mod tls;

use bytes::Bytes;
use link::{Commands, Link, LinkSettings};
use outbox::{Outbox, Settings};
use portcullis_config::Config;
use portcullis_core::audit::Audit;
use portcullis_core::control::{Action, ControlKey, ControlMessage, Sequence};
use portcullis_core::fanout::SubscribeError;
use portcullis_core::forward::{ForwardError, ForwardFuture, Forwarder, Uplink};
use portcullis_core::mailbox::Mailbox;
use portcullis_core::message::{Message, QoS};
use portcullis_core::metrics::Metrics;
use portcullis_core::principal::PrincipalId;
use portcullis_core::retained::RetainedCommands;
use portcullis_core::subscription::{Subscription, SubscriptionKey};
use portcullis_core::topic::TopicName;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use store::{Sealer, Store};
use tokio::sync::mpsc;

/// Replicas: control messages out to the others and in from them.
pub struct ControlLink {
    pub key: ControlKey,
    /// Quarantines, releases and bans decided here, to tell the other replicas.
    pub outgoing: mpsc::UnboundedReceiver<Action>,
    /// Control payloads received from the cluster, not yet checked (bounded: what
    /// finds it full is dropped and counted as refused).
    pub incoming: mpsc::Sender<Bytes>,
}

/// The control topic of an action, under `portcullis/control/`.
pub fn control_topic(action: &Action) -> String {
    format!("portcullis/control/{}", action.kind())
}

/// Why upstream mode could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Store(#[from] store::StoreError),
}

const SERVICES_UPSTREAM: &str =
    "in upstream mode services connect to the broker cluster, not to Portcullis";

pub struct UpstreamForwarder {
    outbox: Outbox,
    commands: Arc<Commands>,
}

impl std::fmt::Debug for UpstreamForwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UpstreamForwarder")
    }
}

/// The link settings of `[upstream]`, with the TLS configuration and credentials read.
pub fn link_settings(config: &Config) -> Result<LinkSettings, StartError> {
    let u = &config.upstream;
    let path = |p: &Option<std::path::PathBuf>| config.upstream_path(p);
    let tls = match path(&u.ca) {
        Some(ca) if u.urls.iter().any(|url| url.tls) => {
            let client = match (path(&u.client_cert), path(&u.client_key)) {
                (Some(c), Some(k)) => Some((c, k)),
                _ => None,
            };
            let client = client.as_ref().map(|(c, k)| (c.as_path(), k.as_path()));
            Some(tls::client_config(&ca, client).map_err(StartError::Config)?)
        }
        _ => None,
    };
    let credentials = match path(&u.credentials_file) {
        Some(p) => Some(tls::credentials(&p).map_err(StartError::Config)?),
        None => None,
    };
    Ok(LinkSettings {
        urls: u.urls.clone(),
        client_id: u
            .client_id
            .clone()
            .ok_or_else(|| StartError::Config("upstream.client_id: not set".into()))?,
        tls,
        credentials,
        keep_alive: *u.keep_alive,
        connect_timeout: *u.connect_timeout,
        reconnect_min: *u.reconnect_min,
        reconnect_max: *u.reconnect_max,
        prefix: u.topic_prefix(),
        max_inflight: u.max_inflight,
        session_expiry: u.session_expiry.as_secs().min(u64::from(u32::MAX)) as u32,
        max_attempts: u.outbox.max_attempts,
        // Commands larger than a device could be sent are not taken either.
        max_incoming_packet: config.limits.max_packet_size.min(u32::MAX as usize) as u32,
    })
}

impl UpstreamForwarder {
    /// Open the outbox, start its writer and the link, as tasks on this runtime.
    /// `root` is the key outbox entries are sealed under (derived; it lives outside
    /// the data dir).
    pub async fn start(
        config: &Config,
        root: &[u8; 32],
        retained: Arc<RetainedCommands>,
        control: Option<ControlLink>,
        metrics: Arc<Metrics>,
        audit: Audit,
    ) -> Result<Arc<UpstreamForwarder>, StartError> {
        let settings = link_settings(config)?;
        let path = config.outbox_file();
        let sealer = Sealer::derive(root);
        let (store, loaded) = tokio::task::spawn_blocking(move || Store::open(&path, sealer))
            .await
            .map_err(|e| StartError::Config(format!("opening the outbox: {e}")))??;
        if loaded.depth > 0 {
            tracing::info!(
                messages = loaded.depth,
                bytes = loaded.bytes,
                "the outbox holds messages from before; they are sent first"
            );
        }
        let outbox = Outbox::start(
            store,
            loaded,
            Settings::from_config(&config.upstream.outbox),
            metrics.clone(),
            audit.clone(),
        );
        let (control_in, control_out) = match control {
            Some(c) => (Some(c.incoming), Some((c.key, c.outgoing))),
            None => (None, None),
        };
        let commands = Arc::new(Commands {
            routes: Mutex::new(HashMap::new()),
            retained,
            control: control_in,
        });
        if let Some((key, outgoing)) = control_out {
            tokio::spawn(tell_replicas(
                key,
                settings.client_id.clone(),
                outgoing,
                Uplink::new(outbox.appends.clone(), None),
                metrics.clone(),
            ));
        }
        let link = Link {
            settings,
            outbox: outbox.clone(),
            commands: commands.clone(),
            metrics,
            audit,
        };
        tokio::spawn(link.run());
        Ok(Arc::new(UpstreamForwarder { outbox, commands }))
    }

    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }
}

/// Seal each action under the shared key and send it through the outbox (QoS 1: it
/// waits there like any message while the cluster is away).
async fn tell_replicas(
    key: ControlKey,
    me: String,
    mut outgoing: mpsc::UnboundedReceiver<Action>,
    uplink: Uplink,
    metrics: Arc<Metrics>,
) {
    let mut seq = Sequence::starting_at(outbox::unix_ms());
    while let Some(action) = outgoing.recv().await {
        let Ok(topic) = TopicName::parse_unlimited(&control_topic(&action)) else {
            continue;
        };
        let msg = ControlMessage {
            from: me.clone(),
            seq: seq.advance(),
            at_ms: outbox::unix_ms(),
            action,
        };
        let message = Message {
            topic,
            payload: key.seal(&msg).into(),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: None,
        };
        if uplink.send(message).await.is_err() {
            return;
        }
        Metrics::inc(&metrics.outbox.control_sent);
    }
}

impl Forwarder for UpstreamForwarder {
    fn uplink_for(&self, _id: &PrincipalId) -> Uplink {
        // One channel for everyone: the writer takes messages in arrival order, so a
        // principal's stay in order.
        Uplink::new(self.outbox.appends.clone(), None)
    }

    fn service_uplink(&self, id: &PrincipalId) -> Uplink {
        Uplink::new(self.outbox.appends.clone(), Some(id.clone()))
    }

    fn events(&self) -> Uplink {
        Uplink::new(self.outbox.appends.clone(), None)
    }

    fn register_device(
        &self,
        id: PrincipalId,
        mailbox: Arc<Mailbox>,
    ) -> ForwardFuture<'_, Result<(), ForwardError>> {
        self.commands
            .routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, mailbox);
        Box::pin(async { Ok(()) })
    }

    fn unregister_device(&self, id: PrincipalId, mailbox: Arc<Mailbox>) -> ForwardFuture<'_, ()> {
        let mut routes = self
            .commands
            .routes
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if routes.get(&id).is_some_and(|m| Arc::ptr_eq(m, &mailbox)) {
            routes.remove(&id);
        }
        Box::pin(async {})
    }

    fn attach_service(
        &self,
        _id: PrincipalId,
        _mailbox: Arc<Mailbox>,
    ) -> ForwardFuture<'_, Result<(), ForwardError>> {
        Box::pin(async { Err(ForwardError::Link(SERVICES_UPSTREAM.into())) })
    }

    fn detach_service(&self, _id: PrincipalId, _mailbox: Arc<Mailbox>) -> ForwardFuture<'_, ()> {
        Box::pin(async {})
    }

    fn service_online(&self, _id: PrincipalId, _online: bool) -> ForwardFuture<'_, ()> {
        Box::pin(async {})
    }

    fn subscribe(
        &self,
        _id: PrincipalId,
        _subs: Vec<Subscription>,
    ) -> ForwardFuture<'_, Result<Vec<Result<bool, SubscribeError>>, ForwardError>> {
        Box::pin(async { Err(ForwardError::Link(SERVICES_UPSTREAM.into())) })
    }

    fn unsubscribe(
        &self,
        _id: PrincipalId,
        _keys: Vec<SubscriptionKey>,
    ) -> ForwardFuture<'_, Result<Vec<bool>, ForwardError>> {
        Box::pin(async { Err(ForwardError::Link(SERVICES_UPSTREAM.into())) })
    }
}
