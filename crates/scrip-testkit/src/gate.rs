//! A TCP gate: forwards connections to a real service and can be shut, as
//! a network partition or a dead database looks to a client (open
//! connections reset, new ones refused), then opened again; or can stall
//! the connections open at the time, as a NAT or firewall that dropped
//! their state does (nothing passes, nothing is reset), while new ones
//! pass.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A forwarding port in front of `target`.
#[derive(Debug)]
pub struct Gate {
    addr: SocketAddr,
    open: Arc<AtomicBool>,
    generation: watch::Sender<u64>,
    stalls: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Gate {
    /// Starts forwarding 127.0.0.1:<ephemeral> to `target`.
    ///
    /// # Panics
    /// When no port can be bound.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the gate");
        let addr = listener.local_addr().expect("gate address");
        let open = Arc::new(AtomicBool::new(true));
        let (generation, _) = watch::channel(0u64);
        let (stalls, _) = watch::channel(0u64);
        let task = tokio::spawn(accept(
            listener,
            target,
            open.clone(),
            generation.clone(),
            stalls.clone(),
        ));
        Self {
            addr,
            open,
            generation,
            stalls,
            task,
        }
    }

    /// Where clients connect.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Resets every open connection and refuses new ones.
    pub fn shut(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Stops every connection open now without a word: they stay open,
    /// and nothing more passes either way. Connections made later pass.
    pub fn stall(&self) {
        self.stalls.send_modify(|g| *g += 1);
    }

    /// Lets connections through again.
    pub fn open(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.task.abort();
        self.generation.send_modify(|g| *g += 1);
    }
}

async fn accept(
    listener: TcpListener,
    target: SocketAddr,
    open: Arc<AtomicBool>,
    generation: watch::Sender<u64>,
    stalls: watch::Sender<u64>,
) {
    while let Ok((client, _)) = listener.accept().await {
        if !open.load(Ordering::SeqCst) {
            // Refused: reset at once.
            drop(client.set_nodelay(true));
            drop(client);
            continue;
        }
        let mut shut = generation.subscribe();
        let mut stall = stalls.subscribe();
        tokio::spawn(async move {
            let Ok(mut upstream) = TcpStream::connect(target).await else {
                return;
            };
            let mut client = client;
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                _ = shut.changed() => {
                    drop(client.set_nodelay(true));
                }
                _ = stall.changed() => {
                    // Both ends stay open, and nothing is read or written
                    // until the gate is shut or dropped.
                    let _ = shut.changed().await;
                }
            }
        });
    }
}
