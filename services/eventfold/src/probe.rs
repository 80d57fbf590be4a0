//! `eventfold probe`: one HTTP/1.0 GET of an admin listener's `/readyz`
//! (or `/healthz`) over a plain TCP connection, so that a container's
//! health check needs nothing but the eventfold binary.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, bail};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Largest answer read (the body of `/readyz` is a few lines).
const MAX_ANSWER: u64 = 64 * 1024;

/// Ok when `/readyz` (`/healthz` when `live`) at `admin` answers 200
/// within 3 s; its body is printed either way.
pub(crate) async fn run(admin: SocketAddr, live: bool) -> anyhow::Result<()> {
    let path = if live { "/healthz" } else { "/readyz" };
    let answer = tokio::time::timeout(Duration::from_secs(3), get(admin, path))
        .await
        .with_context(|| format!("{path} at {admin} did not answer within 3 s"))??;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((answer.as_str(), ""));
    print!("{body}");
    let status = head.lines().next().and_then(|line| line.split_whitespace().nth(1)).unwrap_or("");
    if status != "200" {
        bail!("{path} at {admin} answered {}", if status.is_empty() { "no HTTP status" } else { status });
    }
    Ok(())
}

async fn get(admin: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect(admin).await.with_context(|| format!("cannot connect to {admin}"))?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {admin}\r\n\r\n").as_bytes()).await?;
    let mut answer = Vec::new();
    stream.take(MAX_ANSWER).read_to_end(&mut answer).await?;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}
