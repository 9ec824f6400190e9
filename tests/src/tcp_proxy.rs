//! A TCP proxy on 127.0.0.1 for fault tests: between an exchange and its database, say. It
//! passes bytes both ways until told to cut every connection ([`FaultProxy::cut`]: each is
//! reset, as when a route or a firewall drops it) or to stall them ([`FaultProxy::stall`]:
//! connections stay open and nothing moves, as on a link that went silent; only keep-alives
//! and timeouts notice).

use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The proxy; dropping it stops it and closes every connection.
pub struct FaultProxy {
    addr: SocketAddr,
    /// Bumped at each cut: connections of an older generation end.
    generation: watch::Sender<u64>,
    stalled: watch::Sender<bool>,
    accepting: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a free port of 127.0.0.1 and passes every connection on to `target`.
    pub async fn start(target: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (generation, generations) = watch::channel(0u64);
        let (stalled, stalls) = watch::channel(false);
        let accepting = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (generations, stalls) = (generations.clone(), stalls.clone());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    pass(client, server, generations, stalls).await;
                });
            }
        });
        Ok(Self {
            addr,
            generation,
            stalled,
            accepting,
        })
    }

    /// Where to connect instead of the target.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Resets every connection open now (new ones are taken).
    pub fn cut(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// Stops (or starts again) moving bytes on every connection, new ones included; the
    /// connections stay open.
    pub fn stall(&self, stalled: bool) {
        let _ = self.stalled.send(stalled);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accepting.abort();
        self.cut();
    }
}

/// Passes bytes between `client` and `server` until either ends or the generation changes
/// (then both are reset), not while stalled.
async fn pass(
    client: TcpStream,
    server: TcpStream,
    mut generations: watch::Receiver<u64>,
    stalls: watch::Receiver<bool>,
) {
    let born = *generations.borrow_and_update();
    // Closed with a reset, not a FIN: as a connection a network dropped looks to its ends.
    for stream in [&client, &server] {
        let _ = stream.set_zero_linger();
    }
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let up = copy(client_read, server_write, stalls.clone());
    let down = copy(server_read, client_write, stalls);
    tokio::select! {
        () = up => {}
        () = down => {}
        _ = generations.wait_for(|g| *g != born) => {}
    }
}

/// Copies `from` to `to` until either ends, waiting while stalled.
async fn copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut stalls: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if stalls.wait_for(|stalled| !stalled).await.is_err() {
            return;
        }
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            // Stalled while waiting: what comes is read only once it is lifted.
            _ = stalls.wait_for(|stalled| *stalled) => continue,
        };
        if stalls.wait_for(|stalled| !stalled).await.is_err()
            || to.write_all(&buf[..n]).await.is_err()
        {
            return;
        }
    }
}
