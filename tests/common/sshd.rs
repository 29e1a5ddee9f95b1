//! A real OpenSSH server on loopback with a key of its own, and ssh/scp commands that log in to
//! it as root with the matching client key: what a builder's session through ferryd is.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::{TempDir, free_port, local};

/// A running sshd; killed when dropped.
pub struct Sshd {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Where its keys (and anything a test writes for it) live.
    pub dir: TempDir,
    /// Its own log (`sshd -e`), which says how a session ended.
    pub log: PathBuf,
    child: Child,
}

impl Sshd {
    /// Starts sshd, or says why it cannot (not root, or OpenSSH or `extra` tools missing) with a
    /// visible SKIPPED line and returns `None`.
    pub fn start(extra: &[&str]) -> Option<Sshd> {
        let tools: Vec<&str> = ["ssh", "scp", "ssh-keygen"]
            .iter()
            .chain(extra)
            .copied()
            .collect();
        if !super::skip::needs(Some("sshd runs as root"), &tools) {
            return None;
        }
        if !std::path::Path::new("/usr/sbin/sshd").exists() {
            super::skip::skipped("/usr/sbin/sshd is not installed (CI installs openssh-server)");
            return None;
        }
        let dir = TempDir::new("sshd");
        for name in ["host_key", "client_key"] {
            let ok = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(dir.path().join(name))
                .status()
                .expect("run ssh-keygen");
            assert!(ok.success(), "ssh-keygen failed");
        }
        std::fs::copy(
            dir.path().join("client_key.pub"),
            dir.path().join("authorized_keys"),
        )
        .expect("authorized_keys");
        std::fs::create_dir_all("/run/sshd").expect("/run/sshd");
        let port = free_port();
        let log = dir.path().join("sshd.log");
        // OpenSSH 9.8 and later penalize sources whose sessions end badly, which a test that resets
        // sessions on purpose does; older ones do not know the option.
        let penalties = Command::new("/usr/sbin/sshd")
            .args(["-t", "-f", "/dev/null", "-h"])
            .arg(dir.path().join("host_key"))
            .args(["-o", "PerSourcePenalties=no"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        let mut command = Command::new("/usr/sbin/sshd");
        if penalties {
            command.args(["-o", "PerSourcePenalties=no"]);
        }
        let child = command
            .args(["-D", "-e", "-f", "/dev/null", "-h"])
            .arg(dir.path().join("host_key"))
            .args([
                "-o",
                &format!("ListenAddress=127.0.0.1:{port}"),
                "-o",
                "PidFile=none",
                "-o",
                "StrictModes=no",
                "-o",
                "PermitRootLogin=prohibit-password",
                "-o",
                "Subsystem=sftp internal-sftp",
                // VERBOSE: how a session ended ("Read error ...: Connection reset by peer").
                "-o",
                "LogLevel=VERBOSE",
                "-o",
            ])
            .arg(format!(
                "AuthorizedKeysFile={}",
                dir.path().join("authorized_keys").display()
            ))
            .stdout(Stdio::null())
            // Appending: every process of sshd writes at the end, whatever its offset.
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .expect("sshd log"),
            )
            .spawn()
            .expect("spawn sshd");
        let mut sshd = Sshd {
            port,
            dir,
            log,
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(local(port)).is_err() {
            if Instant::now() > deadline || sshd.child.try_wait().ok().flatten().is_some() {
                panic!("sshd did not start; its log:\n{}", sshd.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(sshd)
    }

    /// What sshd logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `program` (ssh or scp) with the client key and no host key prompts, for root@127.0.0.1.
    pub fn client(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command.arg("-i").arg(self.dir.path().join("client_key")).args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
        ]);
        command
    }
}

/// Asserts that an scp exited successfully and that `target` now holds exactly `sent`.
#[track_caller]
pub fn assert_copied(scp: &Output, target: &Path, sent: &[u8]) {
    assert!(
        scp.status.success(),
        "scp: {}",
        String::from_utf8_lossy(&scp.stderr)
    );
    assert!(
        std::fs::read(target).expect("read the copied file") == sent,
        "the file changed on the way"
    );
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
