//! The kernel process: what the descriptor says about starting it ("argv", "env", "seed", "transport",
//! "connects"), its private connection file, its start in a process group of its own, signals to that
//! group, and reaping it. It never touches the service's sockets: relaying to them is the supervisor's,
//! or, for a kernel that "connects", the kernel's own (its argv gets the service's socket prefix).

use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};

use crate::json::Json;
use crate::log;
use crate::net::{free_local_ports, Addr};
use crate::signals::killpg;
use crate::sys::{c_int, setsid, SIGKILL};
use crate::CHANNELS;

/// Where the kernel's private connection file (and its ipc sockets) go; `KERNELBOX_PRIVATE_DIR` (for tests
/// on a host) overrides it.
const DEFAULT_PRIVATE_DIR: &str = "/tmp/kernelbox";
/// The kernel binds all five ports (the relayed CHANNELS and the heartbeat).
const PORT_KEYS: [&str; 5] = ["shell_port", "iopub_port", "stdin_port", "control_port", "hb_port"];

pub struct Kernel {
    /// The image-local descriptor.
    desc: Json,
    /// The service's connection file: the key and signature scheme the kernel's private one keeps.
    conn: Json,
    tcp: bool,
    /// The descriptor's "connects": the kernel connects its four channels to the service's sockets
    /// itself (argv's "{service_ip}"), so there is nothing to relay.
    connects: bool,
    /// The kernel's four sockets, set at each start.
    addrs: Vec<Addr>,
    /// The running kernel, until it has been reaped.
    child: Option<Child>,
    /// `DEFAULT_PRIVATE_DIR` or `KERNELBOX_PRIVATE_DIR`.
    private_dir: String,
    exited: Option<ExitStatus>,
}

impl Kernel {
    pub fn new(desc: Json, conn: Json) -> Kernel {
        let tcp = desc.get("transport").and_then(Json::as_str).unwrap_or("ipc") == "tcp";
        let connects = matches!(desc.get("connects"), Some(Json::Bool(true)));
        Kernel {
            desc,
            conn,
            tcp,
            connects,
            addrs: Vec::new(),
            child: None,
            exited: None,
            private_dir: std::env::var("KERNELBOX_PRIVATE_DIR").unwrap_or_else(|_| DEFAULT_PRIVATE_DIR.to_owned()),
        }
    }

    /// The kernel's sockets, one per relayed channel (in CHANNELS' order); none for a kernel that connects.
    pub fn addrs(&self) -> &[Addr] {
        &self.addrs
    }

    /// Whether the kernel connects to the service's sockets itself.
    pub fn connects(&self) -> bool {
        self.connects
    }

    /// The kernel's private connection file; also sets `self.addrs`.
    fn write_conn_file(&mut self) -> io::Result<String> {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&self.private_dir)?;
        let mut private = self.conn.clone();
        if self.tcp {
            // Free ports, new at each start (not the service's numbers: ports below 1024 would need a
            // capability; ZMTP carries no port numbers).
            let ports = free_local_ports(PORT_KEYS.len())?;
            private.set("transport", Json::Str("tcp".into()));
            private.set("ip", Json::Str("127.0.0.1".into()));
            for (key, port) in PORT_KEYS.iter().zip(&ports) {
                private.set(key, Json::Num(port.to_string()));
            }
            self.addrs = ports[..CHANNELS.len()].iter().map(|p| Addr::Tcp(*p)).collect();
        } else {
            let ip = format!("{}/k", self.private_dir);
            private.set("transport", Json::Str("ipc".into()));
            private.set("ip", Json::Str(ip.clone()));
            let port = |key: &str| self.conn.get(key).and_then(Json::as_port).unwrap_or(0);
            self.addrs = if self.connects {
                Vec::new()
            } else {
                CHANNELS.iter().map(|k| Addr::Unix(format!("{}-{}", ip, port(k)))).collect()
            };
            for key in PORT_KEYS.iter() {
                // A previous kernel's socket files.
                let _ = std::fs::remove_file(format!("{}-{}", ip, port(key)));
            }
        }
        let path = format!("{}/connection.json", self.private_dir);
        let tmp = format!("{}.tmp", path);
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(private.dump(None).as_bytes())?;
        drop(f);
        std::fs::rename(&tmp, &path)?;
        Ok(path)
    }

    fn seed(&self) {
        if let Some(Json::Obj(seeds)) = self.desc.get("seed") {
            for (dest, src) in seeds {
                let src = match src.as_str() {
                    Some(s) => s,
                    None => continue,
                };
                if std::fs::symlink_metadata(dest).is_err() {
                    if let Err(e) = copy_tree(Path::new(src), Path::new(dest)) {
                        log(&format!("cannot seed {} from {}: {}", dest, src, e));
                    }
                }
            }
        }
    }

    /// Seeds, writes the private connection file and starts the kernel it names.
    pub fn spawn(&mut self) -> Result<(), String> {
        self.seed();
        let conn = self.write_conn_file().map_err(|e| format!("private connection file: {}", e))?;
        let service_ip = self.conn.get("ip").and_then(Json::as_str).unwrap_or("").to_owned();
        let template: Vec<String> = match self.desc.get("argv") {
            Some(Json::Arr(items)) => items.iter().map(Json::to_env_string).collect(),
            _ => return Err("the descriptor has no argv".into()),
        };
        if template.is_empty() {
            return Err("the descriptor's argv is empty".into());
        }
        if self.connects && (self.tcp || !template.iter().any(|a| a.contains("{service_ip}"))) {
            // It would never connect, and the service would wait for it until its start timeout.
            return Err("the descriptor says \"connects\" but its transport is not ipc or its argv has no \
                        {service_ip}"
                .into());
        }
        let argv: Vec<String> = template
            .iter()
            .map(|a| a.replace("{connection_file}", &conn).replace("{service_ip}", &service_ip))
            .collect();
        log(&format!("starting kernel: {}", argv.join(" ")));
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]).stdin(Stdio::null());
        if let Some(Json::Obj(env)) = self.desc.get("env") {
            for (k, v) in env {
                cmd.env(k, v.to_env_string());
            }
        }
        // SAFETY: setsid(2) is async-signal-safe. Its own session and process group: signals reach the
        // kernel's children too.
        unsafe {
            cmd.pre_exec(|| {
                setsid();
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| format!("cannot start {}: {}", argv[0], e))?;
        self.child = Some(child);
        self.exited = None;
        Ok(())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn alive(&self) -> bool {
        self.child.is_some() && self.exited.is_none()
    }

    pub fn signal_group(&self, sig: c_int) {
        if self.alive() {
            killpg(self.pid(), sig);
        }
    }

    pub fn reap(&mut self) {
        if self.exited.is_none() {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.exited = Some(status);
                }
            }
        }
    }

    /// KILLs the whole group, also stragglers whose leader is gone, and waits for the leader.
    pub fn kill(&mut self) {
        if self.child.is_some() {
            killpg(self.pid(), SIGKILL);
        }
        if self.exited.is_none() {
            if let Some(child) = self.child.as_mut() {
                self.exited = child.wait().ok();
            }
        }
    }

    /// Once the kernel has been reaped: its status as a shell says it, 128+N for a death by signal N.
    pub fn exit_code(&self) -> Option<i32> {
        self.exited.map(|status| match (status.code(), status.signal()) {
            (Some(code), _) => code,
            (None, Some(sig)) => 128 + sig,
            (None, None) => 1,
        })
    }
}

/// Copies a directory tree (files keep their permission bits), as `shutil.copytree`.
fn copy_tree(src: &Path, dest: &Path) -> io::Result<()> {
    std::fs::create_dir(dest)?;
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        let ty = entry.file_type()?;
        let to = dest.join(entry.file_name());
        if ty.is_dir() {
            copy_tree(&entry.path(), &to)?;
        } else if ty.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(entry.path())?, &to)?;
        } else {
            std::fs::copy(entry.path(), &to)?;
        }
    }
    let perms = std::fs::metadata(src)?.permissions();
    std::fs::set_permissions(dest, perms)
}
