//! Command-line parsing and the commands that are not `serve`.
//!
//! Registry commands go to the running gateway over the admin socket, so they take
//! effect at once (live sessions included). With no gateway running they open the
//! registry directly.

use crate::admin::protocol::{
    AddBan, AddPrincipal, BackupRegistry, CheckRegistry, DeadLetterShown, DisablePrincipal,
    EnablePrincipal, ImportPrincipals, KickClient, ListBans, ListClients, ListOutbox,
    ListPrincipals, ListQuarantine, NewPrincipal, OutboxListed, PurgeDeadLetters, QuarantineDevice,
    QuarantineRow, QuarantineShown, ReleaseDevice, Reload, RemoveBan, RemovePrincipal, Reply,
    RetryDeadLetters, RotateCredentials, RotateMasterKey, ShowDeadLetter, ShowPrincipal,
    ShowQuarantine, request_line,
};
use crate::admin::{AdminError, AdminState, AuditSink, Handler};
use crate::pki::{self, PkiPaths};
use crate::registry_file::{open_registry, registry_sealer};
use crate::usage::UsageError;
use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use portcullis_config::Config;
use portcullis_core::auth::Policies;
use portcullis_core::device_key::{FRAME_KEY_LEN, generate_device_key};
use portcullis_core::principal::PrincipalKind;
use portcullis_core::registry::{CheckSummary, Registry};
use portcullis_core::secret::SecretHasher;
use portcullis_upstream::outbox::OutboxAdmin;
use portcullis_upstream::store::{Sealer, Store};
use serde::Serialize;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// `audit verify` found problems: exit code 1, after listing them.
#[derive(Debug, thiserror::Error)]
#[error("{0} problem(s) found in the audit chain")]
pub struct AuditProblems(pub usize);

/// Read an existing audit key (verification never creates one).
fn read_audit_key(path: &Path) -> Result<[u8; 32]> {
    let bytes = std::fs::read(path)
        .map_err(|e| UsageError(format!("audit key {}: {e}", path.display())))?;
    bytes.as_slice().try_into().map_err(|_| {
        UsageError(format!(
            "audit key {}: must be 32 bytes (got {})",
            path.display(),
            bytes.len()
        ))
        .into()
    })
}

#[derive(Parser, Debug)]
#[command(
    name = "portcullis",
    version,
    about = "A security gateway for connected IoT devices"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug, Clone)]
struct ConfigArg {
    /// Configuration file (default: the embedded default, data in ./data).
    #[arg(long, short = 'c', global = true)]
    config: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the gateway.
    Serve(ConfigArg),
    /// Manage devices.
    Device {
        #[command(subcommand)]
        action: PrincipalAction,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Manage services (cluster consumers of telemetry, senders of commands).
    Service {
        #[command(subcommand)]
        action: PrincipalAction,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Bans on sources (address or CIDR) and principals.
    Ban {
        #[command(subcommand)]
        action: BanAction,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Devices quarantined or on probation by their behaviour model.
    Quarantine {
        #[command(subcommand)]
        action: QuarantineAction,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Upstream mode: the outbox and its dead letters.
    Outbox {
        #[command(subcommand)]
        action: OutboxAction,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Live sessions.
    Clients {
        #[command(subcommand)]
        action: ClientsAction,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Development PKI (for trying mutual TLS; not for production).
    Pki {
        #[command(subcommand)]
        action: PkiAction,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Configuration files.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// The audit log.
    Audit {
        #[command(subcommand)]
        action: AuditAction,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// The registry file: check it, back it up, restore a backup.
    Registry {
        #[command(subcommand)]
        action: RegistryAction,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// The master key the devices' pre-shared keys and frame keys are sealed under.
    MasterKey {
        #[command(subcommand)]
        action: MasterKeyAction,
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Subcommand, Debug)]
enum MasterKeyAction {
    /// A new master key; every device key sealed again under it; the old key dropped
    /// (from PORTCULLIS_MASTER_KEY: put the new key first there, the old one after it;
    /// everything is sealed under the first, and the old one is for you to drop).
    /// Refused, changing nothing, if a device key does not open under the keys held.
    Rotate,
}

#[derive(Subcommand, Debug)]
enum RegistryAction {
    /// Verify every record (MAC, content, counts). Exit 1 if the registry is corrupt.
    Check,
    /// Copy the registry to a new FILE; consistent while the gateway runs.
    Backup { file: PathBuf },
    /// Replace the registry with a backup, after checking it (gateway stopped). The
    /// current file is kept aside.
    Restore { file: PathBuf },
}

#[derive(Subcommand, Debug)]
enum AuditAction {
    /// Check the keyed chain of audit files, given oldest first. Exit 0: intact;
    /// 1: problems found (each named with file and line); 2: bad usage.
    Verify {
        files: Vec<PathBuf>,
        /// Chain key (default: `[audit] key_file` of the configuration).
        #[arg(long)]
        key: Option<PathBuf>,
        /// A checkpoint kept off the box, `SEQ:MAC`: the files must contain it.
        #[arg(long)]
        checkpoint: Option<String>,
    },
    /// The newest audit lines, oldest first, as JSON (also `GET /api/v1/events`).
    Recent {
        /// How many (default 100, at most 1000).
        #[arg(long)]
        limit: Option<usize>,
    },
}

#[derive(Args, Debug)]
struct Credentials {
    /// Pin this certificate (PEM): only it may authenticate the principal.
    #[arg(long)]
    cert: Option<PathBuf>,
    /// Accept any certificate from the group's CA whose identity equals the id.
    #[arg(long)]
    cert_any: bool,
    /// Read the secret from standard input (one line).
    #[arg(long, conflicts_with_all = ["secret_file", "generate_secret"])]
    secret_stdin: bool,
    /// Read the secret from a file.
    #[arg(long, conflicts_with = "generate_secret")]
    secret_file: Option<PathBuf>,
    /// Generate a random secret and print it once.
    #[arg(long)]
    generate_secret: bool,
    /// Generate a DTLS pre-shared key (CoAP; PSK identity = the device id) and print
    /// it once.
    #[arg(long, conflicts_with_all = ["psk_stdin", "psk_file"])]
    psk_generate: bool,
    /// Read the pre-shared key from standard input (one line).
    #[arg(long, conflicts_with_all = ["psk_file", "secret_stdin"])]
    psk_stdin: bool,
    /// Read the pre-shared key from a file.
    #[arg(long)]
    psk_file: Option<PathBuf>,
    /// Generate a serial frame key (32 random bytes) and print it once, in hex, for
    /// flashing into the device.
    #[arg(long, conflicts_with_all = ["serial_key_stdin", "serial_key_file"])]
    serial_key_generate: bool,
    /// Read the serial frame key from standard input: one line of exactly 64 hex digits
    /// (32 bytes).
    #[arg(long, conflicts_with_all = ["serial_key_file", "secret_stdin", "psk_stdin"])]
    serial_key_stdin: bool,
    /// Read the serial frame key from a file: exactly 32 raw bytes, or 64 hex digits (a
    /// trailing newline is removed).
    #[arg(long, value_name = "FILE")]
    serial_key_file: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum PrincipalAction {
    /// Register a principal.
    Add {
        id: String,
        #[arg(long, short = 'g', default_value = "default")]
        group: String,
        #[command(flatten)]
        creds: Credentials,
    },
    /// Register many from a TOML file of [[principal]] entries (all or nothing); with
    /// --sync, make the registry match the file.
    ///
    /// With --sync: add what is new, update what differs, remove what the file does
    /// not list (of this kind only); the plan is printed (`+` add, `~` update, `-`
    /// remove, sorted by id) and applied in one commit. A file with errors changes
    /// nothing, every error named by line. group, enabled (default true) and the
    /// certificate (cert, cert_any) are as the file says. A secret, psk or serial_key
    /// the file leaves out is kept; one given replaces the held one only if it
    /// differs. generate_secret, psk_generate and serial_key_generate make a
    /// credential only for a principal that has none of that kind, printed once: a
    /// sync never rotates a key by itself (`rotate` does). Removing, disabling or
    /// moving a principal to another group, or changing its credentials, ends its
    /// live sessions. See docs/operations.md.
    Import {
        file: PathBuf,
        /// Reconcile the registry to FILE: add, update and remove (see above).
        #[arg(long)]
        sync: bool,
        /// With --sync: print the plan and change nothing.
        #[arg(long, requires = "sync")]
        dry_run: bool,
    },
    List,
    Show {
        id: String,
    },
    Enable {
        id: String,
    },
    /// Refuse new connections and end live sessions.
    Disable {
        id: String,
    },
    /// Delete, ending live sessions.
    Remove {
        id: String,
    },
    /// Replace credentials; sessions that used the old ones end.
    Rotate {
        id: String,
        #[command(flatten)]
        creds: Credentials,
    },
}

#[derive(Subcommand, Debug)]
enum BanAction {
    /// Ban `device/ID`, `service/ID`, an address or a CIDR block. Open sessions it
    /// covers end at once.
    Add {
        target: String,
        /// How long: seconds, or with a unit (90s, 15m, 2h, 7d). Default: until lifted.
        #[arg(long)]
        ttl: Option<String>,
        #[arg(long)]
        reason: Option<String>,
    },
    List,
    Remove {
        target: String,
    },
}

#[derive(Subcommand, Debug)]
enum OutboxAction {
    /// What the outbox holds, and its dead letters (messages the broker refused, or
    /// never acknowledged).
    List {
        /// The admin API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One dead letter, payload included.
    Show {
        seq: u64,
        #[arg(long)]
        json: bool,
    },
    /// Put dead letters back at the end of the outbox, to be sent again.
    Retry {
        seqs: Vec<u64>,
        #[arg(long)]
        all: bool,
    },
    /// Remove dead letters for good.
    Purge {
        seqs: Vec<u64>,
        #[arg(long)]
        all: bool,
    },
}

#[derive(Subcommand, Debug)]
enum QuarantineAction {
    /// Devices quarantined, on probation or released and watched.
    List {
        /// Every device with a behaviour record, normal ones included.
        #[arg(long)]
        all: bool,
        /// The admin API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// A device's state, its transitions and (gateway running) its learned baseline.
    Show {
        id: String,
        /// The admin API's JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Release a quarantined device (it is then watched: an anomaly quarantines it
    /// again at once), or end a probation.
    Release { id: String },
    /// Quarantine a device now.
    Add {
        id: String,
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum ClientsAction {
    List,
    /// End the sessions of a device (or, with --service, a service).
    Kick {
        id: String,
        #[arg(long)]
        service: bool,
    },
}

#[derive(Subcommand, Debug)]
enum PkiAction {
    /// Create a development CA and server certificate in {data_dir}/pki.
    Init {
        /// Extra server names (DNS or IP) besides localhost, 127.0.0.1 and ::1.
        #[arg(long = "name")]
        names: Vec<String>,
    },
    /// Issue a client certificate signed by the development CA.
    Issue {
        name: String,
        /// Replace an existing certificate and key of that name.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigAction {
    /// Validate a configuration file.
    Check { file: PathBuf },
    /// Make the running gateway reload its configuration file (like SIGHUP).
    Reload {
        #[command(flatten)]
        config: ConfigArg,
    },
}

pub fn load_config(path: Option<&Path>) -> Result<Config> {
    match path {
        None => Ok(Config::default()),
        Some(p) => Config::load(p).map_err(|e| UsageError(e.to_string()).into()),
    }
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve(c) => {
            let config = load_config(c.config.as_deref())?;
            crate::serve::run(config, c.config.clone())
        }
        Command::Config {
            action: ConfigAction::Check { file },
        } => {
            let config = Config::load(&file).map_err(|e| UsageError(e.to_string()))?;
            // Schemas are part of the configuration: they must load too.
            portcullis_core::validate::Validator::new(&config.validation, |p| config.resolve(p))
                .map_err(|e| UsageError(format!("{}: {e}", file.display())))?;
            // The HTTP admin API's token file: as `serve` would read it.
            if let (Some(_), Some(token)) = (config.admin.http_listen, config.admin_token_file()) {
                crate::admin::http::Token::load(&token).map_err(|e| UsageError(e.to_string()))?;
            }
            for renamed in &config.renamed {
                eprintln!("{}: warning: {renamed}", file.display());
            }
            println!("{}: ok", file.display());
            Ok(())
        }
        Command::Config {
            action: ConfigAction::Reload { config },
        } => {
            let config = load_config(config.config.as_deref())?;
            print(&call(&config, Reload {})?);
            Ok(())
        }
        Command::Pki { action, config } => {
            let config = load_config(config.config.as_deref())?;
            let paths = PkiPaths::new(config.data_dir.join("pki"));
            match action {
                PkiAction::Init { names } => {
                    pki::init(&paths, &names)?;
                    println!("development CA:      {}", paths.ca_cert().display());
                    println!("server certificate:  {}", paths.server_cert().display());
                    println!("server key:          {}", paths.server_key().display());
                    println!("(development only: keep real CAs off the gateway's disk)");
                }
                PkiAction::Issue { name, force } => {
                    let issued = pki::issue(&paths, &name, force)?;
                    println!("certificate:  {}", issued.cert.display());
                    println!("key:          {}", issued.key.display());
                    println!("sha256:       {}", issued.fingerprint_sha256);
                }
            }
            Ok(())
        }
        Command::Audit {
            action: AuditAction::Recent { limit },
            config,
        } => {
            let config = load_config(config.config.as_deref())?;
            print(&call(
                &config,
                crate::admin::protocol::RecentEvents { limit },
            )?);
            Ok(())
        }
        Command::Audit {
            action:
                AuditAction::Verify {
                    files,
                    key,
                    checkpoint,
                },
            config,
        } => {
            let config = load_config(config.config.as_deref())?;
            // No files named: the configured log, oldest rotated file first.
            let files = if files.is_empty() {
                portcullis_core::audit::log_files(&config.audit_file())
            } else {
                files
            };
            if files.is_empty() {
                bail!(UsageError(format!(
                    "no audit files at {}; name them, oldest first",
                    config.audit_file().display()
                )));
            }
            let key_path = key.unwrap_or_else(|| config.audit_key_file());
            let key = read_audit_key(&key_path)?;
            let expect = match checkpoint {
                None => None,
                Some(c) => Some(
                    portcullis_core::audit::parse_checkpoint_arg(&c)
                        .map_err(|e| UsageError(format!("--checkpoint: {e}")))?,
                ),
            };
            let report = portcullis_core::audit::verify(&files, &key, expect);
            for note in &report.notes {
                println!("note: {note}");
            }
            for problem in &report.problems {
                println!("{problem}");
            }
            if report.is_clean() {
                let last = report
                    .last
                    .as_ref()
                    .map(|(seq, mac)| format!("; last seq {seq}, mac {mac}"))
                    .unwrap_or_default();
                println!(
                    "ok: {} lines in {} file(s) verified{last}",
                    report.lines, report.files
                );
                Ok(())
            } else {
                Err(AuditProblems(report.problems.len()).into())
            }
        }
        Command::Device { action, config } => principal(PrincipalKind::Device, action, config),
        Command::Service { action, config } => principal(PrincipalKind::Service, action, config),
        Command::Ban { action, config } => {
            let config = load_config(config.config.as_deref())?;
            match action {
                BanAction::Add {
                    target,
                    ttl,
                    reason,
                } => {
                    let ttl_secs = ttl.as_deref().map(parse_ttl).transpose()?;
                    let op = AddBan {
                        target,
                        ttl_secs,
                        reason,
                    };
                    print(&call(&config, op)?)
                }
                BanAction::List => print(&call(&config, ListBans {})?),
                BanAction::Remove { target } => print(&call(&config, RemoveBan { target })?),
            }
            Ok(())
        }
        Command::Quarantine { action, config } => {
            let config = load_config(config.config.as_deref())?;
            match action {
                QuarantineAction::List { all, json } => {
                    let rows = call(&config, ListQuarantine { all })?;
                    if json {
                        print(&rows);
                    } else {
                        print_quarantine_table(&rows, all);
                    }
                }
                QuarantineAction::Show { id, json } => {
                    let shown = call(&config, ShowQuarantine { id })?;
                    if json {
                        print(&shown);
                    } else {
                        print_quarantine_show(&shown);
                    }
                }
                QuarantineAction::Release { id } => print(&call(&config, ReleaseDevice { id })?),
                QuarantineAction::Add { id, reason } => {
                    print(&call(&config, QuarantineDevice { id, reason })?)
                }
            }
            Ok(())
        }
        Command::Outbox { action, config } => {
            let config = load_config(config.config.as_deref())?;
            match action {
                OutboxAction::List { json } => {
                    let listed = call(&config, ListOutbox {})?;
                    if json {
                        print(&listed);
                    } else {
                        print_outbox(&listed);
                    }
                }
                OutboxAction::Show { seq, json } => {
                    let shown = call(&config, ShowDeadLetter { seq })?;
                    if json {
                        print(&shown);
                    } else {
                        print_dead_letter(&shown);
                    }
                }
                OutboxAction::Retry { seqs, all } => {
                    let done = call(&config, RetryDeadLetters { seqs, all })?;
                    println!("{} dead letter(s) put back in the outbox", done.count);
                }
                OutboxAction::Purge { seqs, all } => {
                    let done = call(&config, PurgeDeadLetters { seqs, all })?;
                    println!("{} dead letter(s) purged", done.count);
                }
            }
            Ok(())
        }
        Command::Registry { action, config } => {
            let config = load_config(config.config.as_deref())?;
            registry(&config, action)
        }
        Command::MasterKey { action, config } => {
            let config = load_config(config.config.as_deref())?;
            match action {
                MasterKeyAction::Rotate => {
                    let done = call(&config, RotateMasterKey {})?;
                    println!(
                        "master key {} ({}): {} record(s) sealed again, {} old key(s) dropped",
                        done.master, done.source, done.resealed, done.retired
                    );
                }
            }
            Ok(())
        }
        Command::Clients { action, config } => {
            let config = load_config(config.config.as_deref())?;
            match action {
                ClientsAction::List => print(&call(&config, ListClients {})?),
                ClientsAction::Kick { id, service } => {
                    let kind = if service {
                        PrincipalKind::Service
                    } else {
                        PrincipalKind::Device
                    };
                    print(&call(&config, KickClient { kind, id })?)
                }
            }
            Ok(())
        }
    }
}

/// `90` (seconds), or a duration as the configuration reads it: `90s`, `15m`, `2h`,
/// `7d`, `1h 30m` → whole seconds.
fn parse_ttl(s: &str) -> Result<u64> {
    let ttl = portcullis_config::duration::Secs::parse(s)
        .map_err(|e| UsageError(format!("--ttl: {e}; expected e.g. 90s, 15m, 2h, 7d")))?;
    Ok(ttl.as_secs())
}

fn read_secret(creds: &Credentials) -> Result<Option<String>> {
    if creds.generate_secret {
        let mut bytes = [0u8; 24];
        rand_bytes(&mut bytes)?;
        // Printed once, by the caller, only after the gateway stored it.
        return Ok(Some(hex::encode(bytes)));
    }
    let raw = if creds.secret_stdin {
        let mut s = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut s)
            .context("reading the secret from stdin")?;
        s
    } else if let Some(file) = &creds.secret_file {
        std::fs::read_to_string(file).with_context(|| format!("{}", file.display()))?
    } else {
        return Ok(None);
    };
    let secret = raw.trim_end_matches(['\n', '\r']).to_string();
    if secret.is_empty() {
        bail!(UsageError("the secret is empty".into()));
    }
    Ok(Some(secret))
}

/// The pre-shared key the flags name: generated (printed once, by the caller, only
/// after the gateway stored it), or read from stdin or a file. Never from argv.
fn read_psk(creds: &Credentials) -> Result<Option<String>> {
    if creds.psk_generate {
        return Ok(Some(generate_device_key().map_err(|e| {
            anyhow::anyhow!("the system's random source: {e}")
        })?));
    }
    let raw = if creds.psk_stdin {
        let mut s = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut s)
            .context("reading the pre-shared key from stdin")?;
        s
    } else if let Some(file) = &creds.psk_file {
        std::fs::read_to_string(file).with_context(|| format!("{}", file.display()))?
    } else {
        return Ok(None);
    };
    let psk = raw.trim_end_matches(['\n', '\r']).to_string();
    if psk.is_empty() {
        bail!(UsageError("the pre-shared key is empty".into()));
    }
    Ok(Some(psk))
}

/// `text` as a serial key in hex, if it is one (never echoed: only its length is told).
fn serial_key_hex(flag: &str, text: &[u8]) -> Result<String> {
    let text = text
        .strip_suffix(b"\n")
        .map(|t| t.strip_suffix(b"\r").unwrap_or(t))
        .unwrap_or(text);
    let hex_digits = text.iter().all(u8::is_ascii_hexdigit);
    if text.len() != 2 * FRAME_KEY_LEN || !hex_digits {
        let got = if hex_digits {
            format!("{} hex digits", text.len())
        } else {
            format!("{} characters, not all hex digits", text.len())
        };
        bail!(UsageError(format!(
            "{flag}: a serial key is exactly {FRAME_KEY_LEN} bytes: {} hex digits (got {got}); \
             or use --serial-key-generate",
            2 * FRAME_KEY_LEN
        )));
    }
    Ok(String::from_utf8_lossy(text).to_ascii_lowercase())
}

/// The serial frame key the flags name, as the hex the admin API takes: generated
/// (printed once, by the caller, only after the gateway stored it), or read from stdin
/// or a file. Never from argv.
fn read_serial_key(creds: &Credentials) -> Result<Option<String>> {
    if creds.serial_key_generate {
        let mut key = [0u8; FRAME_KEY_LEN];
        rand_bytes(&mut key)?;
        let hex_key = hex::encode(key);
        key.fill(0);
        return Ok(Some(hex_key));
    }
    if creds.serial_key_stdin {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("reading the serial key from stdin")?;
        return serial_key_hex("--serial-key-stdin", line.as_bytes()).map(Some);
    }
    let Some(file) = &creds.serial_key_file else {
        return Ok(None);
    };
    let bytes = std::fs::read(file).with_context(|| format!("{}", file.display()))?;
    // Exactly 32 bytes is the key itself (64 hex digits are never that short).
    if bytes.len() == FRAME_KEY_LEN {
        return Ok(Some(hex::encode(bytes)));
    }
    let flag = format!("--serial-key-file {}", file.display());
    match serial_key_hex(&flag, &bytes) {
        Ok(key) => Ok(Some(key)),
        Err(_) => bail!(UsageError(format!(
            "{flag}: a serial key is exactly {FRAME_KEY_LEN} raw bytes or {} hex digits (got {} bytes); \
             or use --serial-key-generate",
            2 * FRAME_KEY_LEN,
            bytes.len()
        ))),
    }
}

fn rand_bytes(buf: &mut [u8]) -> Result<()> {
    getrandom::fill(buf).map_err(|e| anyhow::anyhow!("the system's random source: {e}"))
}

fn fingerprint(creds: &Credentials) -> Result<Option<String>> {
    creds
        .cert
        .as_deref()
        .map(pki::fingerprint_pem_file)
        .transpose()
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportFile {
    #[serde(default)]
    principal: Vec<ImportEntry>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportEntry {
    id: String,
    #[serde(default)]
    group: Option<String>,
    /// PEM file to pin, relative to the import file.
    #[serde(default)]
    cert: Option<PathBuf>,
    #[serde(default)]
    cert_any: bool,
    #[serde(default)]
    secret: Option<String>,
    #[serde(default)]
    psk: Option<String>,
    /// A serial frame key, 64 hex digits.
    #[serde(default)]
    serial_key: Option<String>,
}

fn principal(kind: PrincipalKind, action: PrincipalAction, config: ConfigArg) -> Result<()> {
    let config = load_config(config.config.as_deref())?;
    let mut generated = None;
    let mut secret_of = |creds: &Credentials| -> Result<Option<String>> {
        let secret = read_secret(creds)?;
        if creds.generate_secret {
            generated.clone_from(&secret);
        }
        Ok(secret)
    };
    let mut generated_psk = None;
    let mut psk_of = |creds: &Credentials| -> Result<Option<String>> {
        let psk = read_psk(creds)?;
        if creds.psk_generate {
            generated_psk.clone_from(&psk);
        }
        Ok(psk)
    };
    let mut generated_serial_key = None;
    let mut serial_key_of = |creds: &Credentials| -> Result<Option<String>> {
        let key = read_serial_key(creds)?;
        if creds.serial_key_generate {
            generated_serial_key.clone_from(&key);
        }
        Ok(key)
    };
    let config = &config;
    match action {
        PrincipalAction::Add { id, group, creds } => {
            if !creds.cert_any
                && creds.cert.is_none()
                && !has_secret(&creds)
                && !has_psk(&creds)
                && !has_serial_key(&creds)
            {
                bail!(UsageError(
                    "give a credential: --cert FILE, --cert-any, --secret-stdin, --secret-file, --generate-secret, --psk-generate, --psk-stdin, --psk-file, --serial-key-generate, --serial-key-stdin or --serial-key-file".into()
                ));
            }
            let principal = NewPrincipal {
                id,
                group: Some(group),
                cert_fingerprint: fingerprint(&creds)?,
                cert_any: creds.cert_any,
                secret: secret_of(&creds)?,
                psk: psk_of(&creds)?,
                serial_key: serial_key_of(&creds)?,
            };
            print(&call(config, AddPrincipal { kind, principal })?)
        }
        PrincipalAction::Import {
            file,
            sync: true,
            dry_run,
        } => sync(config, kind, &file, dry_run)?,
        PrincipalAction::Import { file, .. } => {
            let text =
                std::fs::read_to_string(&file).with_context(|| format!("{}", file.display()))?;
            let parsed: ImportFile = toml::from_str(&text)
                .map_err(|e| UsageError(format!("{}: {}", file.display(), e.message())))?;
            let base = file.parent().unwrap_or(Path::new("."));
            let mut principals = Vec::new();
            for (i, e) in parsed.principal.into_iter().enumerate() {
                let cert_fingerprint = match &e.cert {
                    Some(c) => Some(
                        pki::fingerprint_pem_file(&base.join(c))
                            .with_context(|| format!("{}: entry {}", file.display(), i + 1))?,
                    ),
                    None => None,
                };
                principals.push(NewPrincipal {
                    id: e.id,
                    group: e.group,
                    cert_fingerprint,
                    cert_any: e.cert_any,
                    secret: e.secret,
                    psk: e.psk,
                    serial_key: e.serial_key,
                });
            }
            print(&call(config, ImportPrincipals { kind, principals })?)
        }
        PrincipalAction::List => print(&call(config, ListPrincipals { kind })?),
        PrincipalAction::Show { id } => print(&call(config, ShowPrincipal { kind, id })?),
        PrincipalAction::Enable { id } => print(&call(config, EnablePrincipal { kind, id })?),
        PrincipalAction::Disable { id } => print(&call(config, DisablePrincipal { kind, id })?),
        PrincipalAction::Remove { id } => print(&call(config, RemovePrincipal { kind, id })?),
        PrincipalAction::Rotate { id, creds } => {
            let op = RotateCredentials {
                kind,
                id,
                cert_fingerprint: fingerprint(&creds)?,
                cert_any: creds.cert_any,
                secret: secret_of(&creds)?,
                psk: psk_of(&creds)?,
                serial_key: serial_key_of(&creds)?,
            };
            print(&call(config, op)?)
        }
    }
    // A generated secret is shown once, on stdout, for the operator to hand to the
    // device, and only once the gateway has accepted it: a refused one exists nowhere.
    if let Some(secret) = generated {
        println!("secret: {secret}");
    }
    if let Some(psk) = generated_psk {
        println!("psk: {psk}");
    }
    if let Some(key) = generated_serial_key {
        println!("serial key: {key}");
        eprintln!(
            "portcullis: flash the serial key above into the device (its frames are checked \
             with it); it is not shown again"
        );
    }
    Ok(())
}

/// `import --sync`: every error of the file at once (those found reading it here and
/// those the gateway finds), or the plan, applied unless `dry_run`.
fn sync(config: &Config, kind: PrincipalKind, file: &Path, dry_run: bool) -> Result<()> {
    let (entries, problems) = crate::sync_file::read(file)?;
    if !problems.is_empty() {
        // What the gateway says of the entries read well, so that one run names all.
        let mut all = problems;
        if !entries.is_empty()
            && let Err(e) = call(config, crate::sync_file::request(kind, entries, true))
        {
            match crate::sync_file::gateway_problems(&e) {
                Some(more) => all.extend(more),
                None => return Err(e),
            }
        }
        return Err(crate::sync_file::refused(file, all));
    }
    let request = crate::sync_file::request(kind, entries, dry_run);
    // Unlike an import, a sync cannot be split: each part would remove the others.
    let size = request_line(request.clone())?.len();
    if size > crate::admin::protocol::MAX_REQUEST
        && UnixStream::connect(config.admin_socket()).is_ok()
    {
        bail!(UsageError(format!(
            "{}: the sync is {size} bytes, over the admin socket's limit of {} bytes, and \
             cannot be split (each part would remove the others): stop the gateway and run \
             it on the registry file",
            file.display(),
            crate::admin::protocol::MAX_REQUEST
        )));
    }
    let plan = call(config, request).map_err(|e| match crate::sync_file::gateway_problems(&e) {
        Some(problems) => crate::sync_file::refused(file, problems),
        None => e.context(format!("{}", file.display())),
    })?;
    crate::sync_file::print_plan(kind, file, &plan, dry_run);
    Ok(())
}

fn summary(s: &CheckSummary) -> String {
    format!(
        "{} principal(s), {} ban(s), {} behaviour record(s)",
        s.principals, s.bans, s.behaviour
    )
}

fn registry(config: &Config, action: RegistryAction) -> Result<()> {
    match action {
        RegistryAction::Check => {
            let checked = call(config, CheckRegistry {})?;
            println!(
                "ok: {} verified in {}",
                summary(&checked),
                config.registry_file().display()
            );
        }
        RegistryAction::Backup { file } => {
            let path = std::path::absolute(&file)
                .map_err(|e| UsageError(format!("backup file {}: {e}", file.display())))?;
            if path.exists() {
                bail!(UsageError(format!(
                    "backup file {} exists; name a new file",
                    path.display()
                )));
            }
            let copied = call(config, BackupRegistry { path: path.clone() })?;
            println!("backed up {} to {}", summary(&copied), path.display());
        }
        RegistryAction::Restore { file } => {
            let socket = config.admin_socket();
            if UnixStream::connect(&socket).is_ok() {
                bail!(UsageError(format!(
                    "the gateway is running (admin socket {}): stop it before restoring",
                    socket.display()
                )));
            }
            if !file.is_file() {
                bail!(UsageError(format!(
                    "backup file {}: not found",
                    file.display()
                )));
            }
            let sealer = registry_sealer(config)?;
            // The copy is checked, not the operator's file (opening it must not change
            // it), and a backup is always sealed: one without a seal is refused.
            let live = config.registry_file();
            let staged = live.with_extension("redb.restoring");
            std::fs::copy(&file, &staged)
                .and_then(|_| std::fs::File::open(&staged)?.sync_all())
                .with_context(|| format!("copying {} to {}", file.display(), staged.display()))?;
            let checked = Registry::open_with(
                &staged,
                sealer.clone(),
                portcullis_core::registry::Legacy::Refuse,
            )
            .and_then(|r| r.check());
            // A backup from an older gateway was upgraded on the staged copy; the
            // operator's file is its original, so that copy is not kept.
            let _ = std::fs::remove_file(portcullis_core::registry::format2_copy(&staged));
            let checked = match checked {
                Ok(checked) => checked,
                Err(e) => {
                    let _ = std::fs::remove_file(&staged);
                    return Err(anyhow::Error::new(e).context(format!(
                        "backup {} failed its check; not restored",
                        file.display()
                    )));
                }
            };
            let aside = live.with_extension(format!(
                "redb.before-restore-{}",
                portcullis_core::registry::now_unix()
            ));
            if live.exists() {
                std::fs::rename(&live, &aside).with_context(|| {
                    format!("moving {} aside to {}", live.display(), aside.display())
                })?;
            }
            std::fs::rename(&staged, &live)
                .with_context(|| format!("moving {} to {}", staged.display(), live.display()))?;
            drop(open_registry(config, sealer)?);
            println!(
                "restored {} from {} to {}",
                summary(&checked),
                file.display(),
                live.display()
            );
            if live.exists() && aside.exists() {
                println!("the previous file is kept at {}", aside.display());
            }
        }
    }
    Ok(())
}

/// The audit chain settings, for writing with no gateway running.
fn offline_audit(config: &Config) -> Result<portcullis_core::audit::AuditSettings> {
    let key = portcullis_core::audit::load_or_create_key(&config.audit_key_file())
        .with_context(|| format!("audit key {}", config.audit_key_file().display()))?;
    let mut settings = portcullis_core::audit::AuditSettings::new(config.audit_file(), key);
    settings.max_file_bytes = config.audit.max_file_bytes;
    settings.keep_files = config.audit.keep_files;
    Ok(settings)
}

fn has_psk(c: &Credentials) -> bool {
    c.psk_generate || c.psk_stdin || c.psk_file.is_some()
}

fn has_serial_key(c: &Credentials) -> bool {
    c.serial_key_generate || c.serial_key_stdin || c.serial_key_file.is_some()
}

fn has_secret(c: &Credentials) -> bool {
    c.secret_stdin || c.secret_file.is_some() || c.generate_secret
}

/// A result as the admin API's JSON, keys sorted.
fn print(result: &impl Serialize) {
    match serde_json::to_value(result) {
        Ok(v) => println!(
            "{}",
            serde_json::to_string_pretty(&v).unwrap_or_else(|_| v.to_string())
        ),
        Err(e) => eprintln!("portcullis: the result cannot be shown: {e}"),
    }
}

/// Unix seconds as `YYYY-MM-DD HH:MM:SS` (UTC).
fn utc(unix: u64) -> String {
    let (days, secs) = (unix / 86_400, unix % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// `outbox list`: the summary, then the dead letters as a table.
fn print_outbox(v: &OutboxListed) {
    println!(
        "outbox: {} message(s) waiting, the oldest for {}s; {} dead letter(s)",
        v.messages,
        v.oldest_age_secs,
        v.dead_letters.len()
    );
    if v.dead_letters.is_empty() {
        return;
    }
    println!(
        "{:<10} {:<20} {:<4} {:>8} {:>5}  TOPIC / REASON",
        "SEQ", "DEAD (UTC)", "QOS", "BYTES", "SENDS"
    );
    for d in &v.dead_letters {
        println!(
            "{:<10} {:<20} {:<4} {:>8} {:>5}  {}\n{:>52}{}",
            d.seq,
            utc(d.dead_unix_ms / 1000),
            d.qos,
            d.payload_bytes,
            d.attempts,
            if d.topic.is_empty() {
                "(unreadable)"
            } else {
                &d.topic
            },
            "",
            d.reason
        );
    }
}

/// `outbox show`: one dead letter.
fn print_dead_letter(v: &DeadLetterShown) {
    let d = &v.letter;
    println!("seq:      {}", d.seq);
    println!(
        "topic:    {}",
        if d.topic.is_empty() {
            "(unreadable)"
        } else {
            &d.topic
        }
    );
    println!(
        "qos:      {}{}",
        d.qos,
        if v.retain { " (retained)" } else { "" }
    );
    println!("taken:    {}", utc(v.enqueued_unix_ms / 1000));
    println!("dead:     {}", utc(d.dead_unix_ms / 1000));
    println!("sends:    {}", d.attempts);
    println!("reason:   {}", d.reason);
    println!(
        "payload:  {} bytes{}",
        d.payload_bytes,
        if v.payload_hex { ", hex" } else { "" }
    );
    println!("{}", v.payload);
}

/// `quarantine list` as a table: ID, STATE, SINCE (UTC), REASON.
fn print_quarantine_table(rows: &[QuarantineRow], all: bool) {
    let rows: Vec<[String; 4]> = rows
        .iter()
        .map(|r| {
            [
                r.id.to_string(),
                r.state.as_str().to_string(),
                utc(r.since_unix),
                r.reason.clone().unwrap_or_else(|| "-".to_string()),
            ]
        })
        .collect();
    if rows.is_empty() {
        println!(
            "{}",
            if all {
                "no device has a behaviour record"
            } else {
                "no device is quarantined, on probation or released"
            }
        );
        return;
    }
    let header = ["ID", "STATE", "SINCE", "REASON"].map(String::from);
    let width = |i: usize| {
        std::iter::once(&header)
            .chain(&rows)
            .map(|r| r[i].chars().count())
            .max()
            .unwrap_or(0)
    };
    let (w0, w1, w2) = (width(0), width(1), width(2));
    for r in std::iter::once(&header).chain(&rows) {
        println!("{:w0$}  {:w1$}  {:w2$}  {}", r[0], r[1], r[2], r[3]);
    }
}

/// `quarantine show` as text: state and since, the baseline, then the history.
fn print_quarantine_show(v: &QuarantineShown) {
    let state = v.state.as_str();
    println!("device:    {} (group {})", v.id, v.group);
    match v.since_unix {
        Some(since) => println!("state:     {state} since {} UTC", utc(since)),
        None => println!("state:     {state} (no transition recorded)"),
    }
    if let Some(b) = &v.baseline {
        println!(
            "baseline:  {:.2} msg/s (sd {:.2}), {:.0} B/s (sd {:.0}), learned over {} s",
            b.messages_per_second, b.messages_sd, b.bytes_per_second, b.bytes_sd, b.learned_secs
        );
    }
    if v.history.is_empty() {
        println!("history:   none");
        return;
    }
    println!("history (UTC):");
    for h in &v.history {
        println!(
            "  {}  {} → {}  {}",
            utc(h.at_unix),
            h.from.as_str(),
            h.to.as_str(),
            h.reason
        );
    }
}

/// Send a request to the running gateway, or run it here if none is running.
fn call<O: Handler>(config: &Config, op: O) -> Result<O::Reply> {
    let socket = config.admin_socket();
    match UnixStream::connect(&socket) {
        Ok(mut stream) => {
            let line = request_line(op)?;
            if line.len() > crate::admin::protocol::MAX_REQUEST {
                bail!(UsageError(format!(
                    "the request is {} bytes, over the admin socket's limit of {} bytes; \
                     split the import file",
                    line.len(),
                    crate::admin::protocol::MAX_REQUEST
                )));
            }
            stream
                .write_all(line.as_bytes())
                .with_context(|| format!("admin socket {}", socket.display()))?;
            let mut reply = String::new();
            BufReader::new(stream)
                .read_line(&mut reply)
                .with_context(|| format!("admin socket {}", socket.display()))?;
            let reply: Reply<O::Reply> = serde_json::from_str(&reply)
                .with_context(|| format!("admin socket {}: bad reply", socket.display()))?;
            reply.into_result().map_err(failure)
        }
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            // No gateway: work on the registry directly.
            let registry = open_registry(config, registry_sealer(config)?)?;
            let hasher = SecretHasher::load_or_create(&config.secret_key_file())?;
            let master = crate::registry_file::master_keys_for(config, &registry)?;
            let policies = Policies::from_config(config).map_err(|e| UsageError(e.to_string()))?;
            let state = AdminState {
                registry: Arc::new(registry),
                hasher,
                master: Arc::new(master),
                policies: Arc::new(policies),
                auth: None,
                reload: None,
                sessions: None,
                retained: None,
                behaviours: None,
                outbox: offline_outbox(config)?,
                control: None,
                audit: AuditSink::File(Box::new(offline_audit(config)?)),
                caller: None,
            };
            op.run(&state).map_err(failure)
        }
        Err(e) => Err(e).with_context(|| format!("admin socket {}", socket.display())),
    }
}

/// Upstream mode's outbox, opened directly (no gateway holds it).
fn offline_outbox(config: &Config) -> Result<Option<Arc<OutboxAdmin>>> {
    if config.broker.mode != portcullis_config::BrokerMode::Upstream {
        return Ok(None);
    }
    let key = portcullis_core::audit::load_or_create_key(&config.audit_key_file())
        .with_context(|| format!("audit key {}", config.audit_key_file().display()))?;
    let (store, loaded) = Store::open(&config.outbox_file(), Sealer::derive(&key))?;
    Ok(Some(Arc::new(OutboxAdmin::offline(store, &loaded))))
}

/// The operator's mistake exits 2, the gateway's 1.
fn failure(e: AdminError) -> anyhow::Error {
    match e {
        AdminError::Usage(m) | AdminError::NotFound(m) => UsageError(m).into(),
        AdminError::Runtime(m) => anyhow::anyhow!(m),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ban_ttls_read_as_durations() {
        for (text, secs) in [
            ("90", 90),
            ("90s", 90),
            ("15m", 900),
            ("2h", 7200),
            ("7d", 604_800),
            ("1h 30m", 5400),
        ] {
            assert_eq!(parse_ttl(text).unwrap(), secs, "{text}");
        }
        for bad in ["", "7x", "-5s", "soon", "1500ms"] {
            let err = parse_ttl(bad).unwrap_err().to_string();
            assert!(err.contains("--ttl") && err.contains("7d"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_serial_key_is_read_as_64_hex_digits_and_a_wrong_one_names_the_flag_and_the_length() {
        let key = "000102030405060708090A0B0C0D0E0F101112131415161718191a1b1c1d1e1f";
        for text in [key.to_string(), format!("{key}\n"), format!("{key}\r\n")] {
            assert_eq!(
                serial_key_hex("--serial-key-stdin", text.as_bytes()).unwrap(),
                key.to_ascii_lowercase()
            );
        }
        for (text, got) in [
            (&key[..62], "62 hex digits"),
            ("", "0 hex digits"),
            (&format!("{key}00")[..], "66 hex digits"),
        ] {
            let err = serial_key_hex("--serial-key-stdin", text.as_bytes())
                .unwrap_err()
                .to_string();
            assert_eq!(
                err,
                format!(
                    "--serial-key-stdin: a serial key is exactly 32 bytes: 64 hex digits (got {got}); \
                     or use --serial-key-generate"
                )
            );
        }
        let secretish = format!("{}-not-hex", &key[..56]);
        let err = serial_key_hex("--serial-key-stdin", secretish.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(err.contains("64 characters, not all hex digits"), "{err}");
        assert!(!err.contains("0001020304"), "{err}");
    }

    #[test]
    fn a_serial_key_file_holds_32_raw_bytes_or_64_hex_digits() {
        let dir = tempfile::tempdir().unwrap();
        let creds = |file: &Path| {
            let cli = Cli::try_parse_from([
                "portcullis",
                "device",
                "add",
                "pump-1",
                "--serial-key-file",
                file.to_str().unwrap(),
            ])
            .unwrap();
            match cli.command {
                Command::Device {
                    action: PrincipalAction::Add { creds, .. },
                    ..
                } => creds,
                other => panic!("{other:?}"),
            }
        };
        let raw = dir.path().join("raw.key");
        // Raw bytes that end in a newline are still the key, not a line.
        let mut bytes = [0x5au8; 32];
        bytes[31] = b'\n';
        std::fs::write(&raw, bytes).unwrap();
        assert_eq!(
            read_serial_key(&creds(&raw)).unwrap(),
            Some(hex::encode(bytes))
        );
        let text = dir.path().join("hex.key");
        std::fs::write(&text, format!("{}\n", "ab".repeat(32))).unwrap();
        assert_eq!(
            read_serial_key(&creds(&text)).unwrap(),
            Some("ab".repeat(32))
        );
        let short = dir.path().join("short.key");
        std::fs::write(&short, [1u8; 31]).unwrap();
        let err = read_serial_key(&creds(&short)).unwrap_err().to_string();
        assert!(
            err.contains("--serial-key-file")
                && err.contains("exactly 32 raw bytes or 64 hex digits (got 31 bytes)"),
            "{err}"
        );
    }

    #[test]
    fn the_serial_key_flags_take_no_key_on_the_command_line() {
        let parse = |args: &[&str]| {
            Cli::try_parse_from(["portcullis", "device", "add", "pump-1"].iter().chain(args))
        };
        let key = "ab".repeat(32);
        for args in [
            vec!["--serial-key-stdin", key.as_str()],
            vec!["--serial-key-generate", key.as_str()],
            vec!["--serial-key", key.as_str()],
            vec![&format!("--serial-key-generate={key}")[..]],
        ] {
            let err = parse(&args).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
        // One source of the key, and stdin for one credential only.
        for args in [
            ["--serial-key-generate", "--serial-key-stdin"],
            ["--serial-key-stdin", "--psk-stdin"],
            ["--serial-key-stdin", "--secret-stdin"],
        ] {
            assert!(parse(&args).is_err(), "{args:?}");
        }
        // Beside a pre-shared key: a device may have both.
        assert!(parse(&["--psk-generate", "--serial-key-generate"]).is_ok());
        assert!(parse(&["--psk-stdin", "--serial-key-generate"]).is_ok());
    }

    #[test]
    fn unix_seconds_print_as_utc_calendar_time() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(utc(1_795_754_798), "2026-11-27 04:46:38");
        assert_eq!(utc(4_107_542_399), "2100-02-28 23:59:59");
    }
}
