//! The admin socket: a Unix socket only our uid (or root) may use, one request line
//! in, one reply line out, several per connection.

use super::AdminState;
use super::protocol::{MAX_REQUEST, Reply, Request};
use std::path::Path;
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

/// Bind the admin socket: owner-only permissions, stale socket replaced.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        // A live gateway holds the registry lock, so reaching here means it is stale.
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serve admin requests until the listener is dropped.
pub async fn serve(listener: UnixListener, state: Arc<AdminState>) {
    let me = unsafe_free_uid();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let allowed = stream
            .peer_cred()
            .map(|c| c.uid() == me || c.uid() == 0)
            .unwrap_or(false);
        let state = state.clone();
        tokio::spawn(async move {
            let (rd, mut wr) = stream.into_split();
            if !allowed {
                let refused = Reply::<()>::refused("permission denied".into()).to_line();
                let _ = wr.write_all(refused.as_bytes()).await;
                return;
            }
            let mut lines = BufReader::new(rd.take(MAX_REQUEST as u64)).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let reply = match serde_json::from_str::<Request>(&line) {
                    Ok(req) => {
                        let state = state.clone();
                        // Registry writes are synchronous redb commits.
                        tokio::task::spawn_blocking(move || state.answer(req))
                            .await
                            .unwrap_or_else(|e| Reply::<()>::refused(e.to_string()).to_line())
                    }
                    Err(e) => Reply::<()>::refused(format!("bad request: {e}")).to_line(),
                };
                if wr.write_all(reply.as_bytes()).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// Our effective uid, read from /proc so no `unsafe` libc call is needed.
fn unsafe_free_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::protocol::Principal;
    use crate::admin::testing::offline;

    #[tokio::test]
    async fn one_connection_carries_several_requests_each_answered_on_its_line() {
        let (dir, state) = offline();
        let path = dir.path().join("admin.sock");
        let server = tokio::spawn(serve(bind(&path).unwrap(), Arc::new(state)));
        let (rd, mut wr) = tokio::net::UnixStream::connect(&path)
            .await
            .unwrap()
            .into_split();
        let mut replies = BufReader::new(rd).lines();
        wr.write_all(
            b"{\"op\":\"list\",\"kind\":\"device\"}\n\
              not json\n\
              {\"op\":\"show\",\"kind\":\"device\",\"id\":\"nope\"}\n",
        )
        .await
        .unwrap();
        let list = replies.next_line().await.unwrap().unwrap();
        let list: Reply<Vec<Principal>> = serde_json::from_str(&list).unwrap();
        let ids: Vec<_> = list
            .into_result()
            .unwrap()
            .into_iter()
            .map(|p| p.id.to_string())
            .collect();
        assert_eq!(ids, ["sensor-1", "sensor-2"]);
        let bad = replies.next_line().await.unwrap().unwrap();
        assert!(bad.starts_with("{\"error\":\"bad request: "), "{bad}");
        assert!(
            !bad.contains("usage"),
            "nothing ran, so no usage flag: {bad}"
        );
        let missing = replies.next_line().await.unwrap().unwrap();
        assert_eq!(
            missing,
            "{\"error\":\"no such device: nope\",\"ok\":false,\"usage\":true}"
        );
        server.abort();
    }
}
