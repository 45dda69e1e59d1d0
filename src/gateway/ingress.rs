//! Where WebSocket clients' input is read and acted on: a runtime of its own,
//! whose threads run at a lower CPU priority than the node's main runtime.
//!
//! Why: the main runtime carries the deliveries (the backplane's reader, the
//! hub's dispatcher and slices, every connection's writer). Clients choose
//! when they send, and many clients send in step: 200 clients, each
//! subscribing and unsubscribing 50 times a second, wake a hundred reader
//! tasks per node at once, every 20 ms. On the same workers, a publication
//! that arrived with such a burst waited in the run queue behind all of them,
//! and other clients' p99 rose 3-4× on 2 vCPUs (docs/benchmarks.md, Abuse).
//! On their own threads with a nice value 10 above the process's, readers
//! still get every CPU cycle that deliveries leave (niceness only matters
//! while the CPUs are contended), but the kernel runs a waking delivery
//! thread before them.
//!
//! What runs here: each WebSocket connection's session (native and
//! Socket.IO): reading frames, the rate limits, subscribing (hub, history
//! reads), hooks, the tasks those spawn, and the writing of a reader's own
//! answers when its writer is idle (`Outbox::hold_wakes`). What does not:
//! the writers, which [`Ingress::spawn_writer`] puts on the main runtime,
//! and every HTTP request (long-polling, SSE, the REST API).
//!
//! Raising one's own niceness needs no privilege. Where the kernel refuses
//! (or off Linux) the threads keep the process's priority and only the
//! separate run queues remain.

use std::future::Future;

use tokio::runtime::{Handle, Runtime};

/// How much lower the readers' priority is (nice steps; each is ≈ 1.25× less
/// CPU weight under contention, so 10 is ≈ 10×).
const NICENESS: i32 = 10;

pub struct Ingress {
    /// Taken by `Drop`.
    runtime: Option<Runtime>,
    handle: Handle,
    /// The runtime the node was built on: where writers go.
    main: Handle,
}

impl Ingress {
    /// Starts the readers' runtime with half as many workers as `main`, the
    /// runtime the deliveries run on (at least one).
    ///
    /// Half: clients' input can then never hold every CPU at once, so a
    /// delivery thread that wakes finds an idle CPU instead of waiting for
    /// the kernel to preempt a reader (niceness weighs CPU time, it does not
    /// preempt at once). With as many readers as workers on 2 vCPUs, other
    /// clients' p99 under the abuse scenario rose 1.8–2.3× beside the
    /// `fanout` shape and 1.1–2.4× beside a light load; with one reader
    /// 1.3–1.9× and 0.9–1.8×, on the VM where the two were alternated
    /// (docs/benchmarks.md, Abuse; later VMs gave one reader 0.9–2.4×
    /// beside the light load, the spread of a sub-millisecond p99 on a
    /// shared machine). Input that needs
    /// more than half the node waits in its sockets, which is where a burst
    /// of it belongs.
    pub fn start(main: Handle) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads((main.metrics().num_workers() / 2).max(1))
            .thread_name("switchboard-ingress")
            .on_thread_start(lower_priority)
            .enable_all()
            .build()?;
        Ok(Self {
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
            main,
        })
    }

    /// Runs a connection's session on the readers' runtime.
    pub fn spawn<F>(&self, session: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        drop(self.handle.spawn(session));
    }

    /// Runs a connection's writer on the main runtime, with the deliveries.
    pub fn spawn_writer<F>(&self, writer: F) -> tokio::task::JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.main.spawn(writer)
    }
}

impl Drop for Ingress {
    fn drop(&mut self) {
        // The last node handle may go on one of this runtime's own threads
        // (a session ending), where a runtime cannot be dropped; a thread of
        // its own can, without waiting for the sessions left.
        if let Some(runtime) = self.runtime.take() {
            let _ = std::thread::Builder::new()
                .name("switchboard-ingress-stop".into())
                .spawn(move || runtime.shutdown_background());
        }
    }
}

#[cfg(target_os = "linux")]
fn lower_priority() {
    // SAFETY: plain syscalls on the calling thread; on Linux the nice value
    // is per thread, and `gettid` names this one only.
    unsafe {
        let tid = libc::gettid() as libc::id_t;
        *libc::__errno_location() = 0;
        let now = libc::getpriority(libc::PRIO_PROCESS, tid);
        if now == -1 && *libc::__errno_location() != 0 {
            return;
        }
        libc::setpriority(libc::PRIO_PROCESS, tid, (now + NICENESS).min(19));
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_priority() {}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    fn own_nice() -> i32 {
        // SAFETY: reads the calling thread's nice value.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
    }

    #[tokio::test]
    async fn sessions_run_below_the_main_runtime_and_writers_on_it() {
        let main = own_nice();
        let ingress = Ingress::start(Handle::current()).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        ingress.spawn(async move {
            let _ = tx.send(own_nice());
        });
        assert_eq!(rx.await.unwrap(), (main + NICENESS).min(19));
        let writer = ingress.spawn_writer(async move {
            assert_eq!(own_nice(), main);
        });
        writer.await.unwrap();
    }
}
