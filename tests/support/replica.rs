//! A real `epp` process for the multi-replica tests: started with its gRPC, health and metrics
//! ports on free loopback ports, output discarded, killed on drop.

use std::{
    collections::BTreeSet,
    ffi::OsStr,
    process::{Child, Command, Stdio},
};

use parking_lot::Mutex;

/// One `epp` process.
pub struct Replica {
    /// The process.
    pub child: Child,
    /// Its ext_proc port.
    pub grpc: u16,
    /// Its gRPC health port.
    pub health: u16,
    /// Its `/metrics` port.
    pub metrics: u16,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free TCP port on 127.0.0.1 (bound and released), never one this test process handed out
/// before: a port released here is free to the kernel again, and a second call could otherwise
/// give it to another process of the same test (two replicas on one port: one never serves).
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let mut handed_out = HANDED_OUT.lock();
    for _ in 0..1000 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if handed_out.insert(port) {
            return port;
        }
    }
    panic!("no fresh loopback port in 1000 tries");
}

/// Start `epp` with `flags` (besides its ports) and `envs`.
pub fn start_epp(flags: &[String], envs: &[(&str, &OsStr)]) -> Replica {
    let (grpc, health, metrics) = (free_port(), free_port(), free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_epp"))
        .args(flags)
        .args([
            format!("--grpc-port={grpc}"),
            format!("--grpc-health-port={health}"),
            format!("--metrics-port={metrics}"),
        ])
        .envs(envs.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Replica {
        child,
        grpc,
        health,
        metrics,
    }
}
