//! Portcullis core: principals, registry, authentication, the pipeline and the
//! forwarder seam. Knows nothing of MQTT framing: adapters translate their protocol into the
//! types here and act on the verdicts they get back.

pub mod acl;
pub mod admission;
pub mod audit;
pub mod auth;
pub mod auth_alert;
pub mod backoff;
pub mod bans;
pub mod behaviour;
pub mod behaviour_record;
pub mod content;
pub mod control;
pub mod device_census;
pub mod device_key;
pub mod device_session;
pub mod fanout;
pub mod forward;
pub mod limit;
pub mod mailbox;
pub mod message;
pub mod metrics;
pub mod parking;
pub mod peer;
pub mod principal;
pub mod process_metrics;
pub mod proxy_header;
pub mod quarantine;
pub mod record;
pub mod refusal;
pub mod registry;
pub mod retained;
pub mod secret;
pub mod session_file;
pub mod sessions;
pub mod source_gate;
pub mod source_key;
pub mod storage;
pub mod subscription;
pub mod topic;
pub mod validate;
pub mod wire;
