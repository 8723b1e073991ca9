//! A real `redis-server` on a free loopback port for the budget tests, killed on drop.

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use epp::budget::RedisStore;

/// A running `redis-server`.
pub struct Redis {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start `redis-server` without persistence and wait (at most 5 s) until it answers.
pub async fn start_redis() -> Redis {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server must be installed (apt-get install redis-server; .ci/run does it)");
    let store = RedisStore::new(&format!("redis://127.0.0.1:{port}"), Duration::from_millis(200)).unwrap();
    for _ in 0..100 {
        if store.ping().await.is_ok() {
            return Redis { child, port };
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("redis-server did not answer within 5 s");
}
