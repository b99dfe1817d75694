//! llama.cpp's RPC backend (ggml-rpc): remote devices that hold some of a model's layers.
//!
//! # Layout
//! - [`RpcEndpoint`]: a parsed `host:port` (what instance options and `paddock worker` take).
//! - [`attach`]: makes a worker's devices usable by this process's model loads and returns a
//!   [`RpcLease`]; [`load_devices`]: the device list a model load passes to llama.cpp.
//! - [`serve`]: `paddock worker`, ggml's RPC server on this machine's devices.
//! - [`local_devices`]: this machine's devices, for listings that must not touch a worker.
//!
//! `ggml-rpc.h` is not in llama-cpp-sys-2's bindings, so its two entry points are looked up
//! through ggml's backend registry (`ggml_backend_reg_get_proc_address`), as llama.cpp's own
//! `--rpc` does (`add_rpc_devices` in common/arg.cpp). Everything else is ggml-backend API.
//!
//! # What aborts, and what paddock checks first
//! ggml-rpc ends the process (`GGML_ABORT`) when it cannot parse an endpoint, cannot connect, or
//! when the handshake or any later message fails ("Remote RPC server crashed or returned
//! malformed response"); its connect (`gethostbyname` + blocking `connect`) has no timeout. So
//! before ggml first sees a worker, [`attach`] resolves the name to an IPv4 address in Rust and
//! runs the protocol's handshake itself with timeouts ([`probe`]): a worker that is down, busy or
//! of another version is a clear [`EngineError`]. A worker lost *while serving* still aborts
//! this process: that is what `isolation: "process"` contains.
//!
//! # Process-wide state
//! ggml's device list is a process-wide vector that registering a worker appends to, without a
//! lock; model loads and context creation read it. [`devices_read`] is held by those readers and
//! the registration takes the write side. A worker serves one client connection at a time, and
//! ggml keeps one connection per worker per process while any buffer on it lives; the lease
//! count tells [`attach`] whether that connection exists (then no probe: it would wait behind it).

use std::collections::HashMap;
#[cfg(feature = "rpc")]
use std::ffi::CString;
use std::ffi::CStr;
use std::fmt;
use std::io::{Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpStream, ToSocketAddrs};
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::Duration;

use llama_cpp_sys_2 as sys;
use parking_lot::{Mutex, RwLock, RwLockReadGuard};
use serde::{Deserialize, Serialize};

use super::EngineError;

/// ggml-rpc's protocol version, from the vendored `ggml/include/ggml-rpc.h`
/// (`RPC_PROTO_MAJOR_VERSION` …). A client and a worker must share the major version and the
/// worker's minor must not be newer: in practice, run the same paddock build on both ends.
const PROTO: (u8, u8, u8) = (7, 0, 0);
/// `RPC_CMD_HELLO` and `RPC_CMD_DEVICE_COUNT` of ggml-rpc.cpp's `enum rpc_cmd`.
const CMD_HELLO: u8 = 14;
const CMD_DEVICE_COUNT: u8 = 15;
/// `RPC_CONN_CAPS_SIZE` (ggml-rpc/transport.h): the transport capabilities in a HELLO. Zeros
/// = plain TCP.
const CONN_CAPS: usize = 24;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// llama-cpp-2 keeps 16 device slots and llama.cpp reads them up to a null entry.
pub const MAX_DEVICES: usize = 15;

/// A worker's address as ggml-rpc takes it: an IPv4 literal or a host name, and a port.
/// ggml-rpc speaks IPv4 only (`inet_addr`, `gethostbyname`), so IPv6 literals are refused.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RpcEndpoint {
    pub host: String,
    pub port: u16,
}

impl FromStr for RpcEndpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let Some((host, port)) = s.rsplit_once(':') else {
            return Err(format!("`{s}` is not host:port (e.g. 10.0.0.2:50052)"));
        };
        if host.contains(':') || host.starts_with('[') {
            return Err(format!("`{s}`: ggml's RPC backend speaks IPv4 only; give an IPv4 address or a host name"));
        }
        let valid = |c: char| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_';
        if host.is_empty() || host.len() > 253 || !host.chars().all(valid) {
            return Err(format!("`{s}`: `{host}` is not an IPv4 address or a host name"));
        }
        match port.parse::<u16>() {
            Ok(port) if port > 0 => Ok(RpcEndpoint { host: host.to_string(), port }),
            _ => Err(format!("`{s}`: the port must be a number from 1 to 65535")),
        }
    }
}

impl TryFrom<String> for RpcEndpoint {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<RpcEndpoint> for String {
    fn from(e: RpcEndpoint) -> String {
        e.to_string()
    }
}

impl fmt::Display for RpcEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

impl RpcEndpoint {
    /// The first IPv4 address the host resolves to (a literal resolves to itself).
    pub fn resolve(&self) -> Result<SocketAddrV4, String> {
        let addrs = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|e| format!("worker {self}: cannot resolve {}: {e}", self.host))?;
        addrs
            .filter_map(|a| match a {
                SocketAddr::V4(v4) => Some(v4),
                SocketAddr::V6(_) => None,
            })
            .next()
            .ok_or_else(|| {
                format!("worker {self}: {} has no IPv4 address (ggml's RPC backend speaks IPv4 only)", self.host)
            })
    }
}

/// Runs ggml-rpc's handshake (HELLO, then DEVICE_COUNT) against `addr` with timeouts, and closes
/// the connection: the worker goes back to waiting for a client. Returns the worker's device
/// count. `shown` names the worker in errors as the user wrote it.
pub fn probe(shown: &str, addr: SocketAddrV4) -> Result<u32, String> {
    probe_within(shown, addr, REPLY_TIMEOUT)
}

fn probe_within(shown: &str, addr: SocketAddrV4, reply_timeout: Duration) -> Result<u32, String> {
    let mut stream = TcpStream::connect_timeout(&addr.into(), CONNECT_TIMEOUT)
        .map_err(|e| format!("worker {shown} is not reachable: {e}"))?;
    let busy = || {
        format!(
            "worker {shown} accepted the connection but did not answer ggml's RPC handshake within {:?}: \
             it is not a paddock worker, or it is serving another client (a worker serves one paddock process at a time)",
            reply_timeout
        )
    };
    let io = |e: std::io::Error| {
        if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) {
            busy()
        } else {
            format!("worker {shown} closed the connection during ggml's RPC handshake ({e}): is it a paddock worker?")
        }
    };
    stream
        .set_read_timeout(Some(reply_timeout))
        .and_then(|_| stream.set_write_timeout(Some(reply_timeout)))
        .map_err(io)?;
    let _ = stream.set_nodelay(true);

    // | cmd (1 byte) | size (u64) | payload |, answered by | size (u64) | payload |; native byte order.
    let mut hello = vec![CMD_HELLO];
    hello.extend_from_slice(&(CONN_CAPS as u64).to_ne_bytes());
    hello.extend_from_slice(&[0u8; CONN_CAPS]);
    stream.write_all(&hello).map_err(io)?;
    let reply = read_reply(&mut stream, 4 + CONN_CAPS).map_err(io)?.ok_or_else(busy)?;
    let (major, minor, patch) = (reply[0], reply[1], reply[2]);
    if major != PROTO.0 || minor > PROTO.1 {
        return Err(format!(
            "worker {shown} speaks ggml RPC protocol {major}.{minor}.{patch}, this paddock {}.{}.{}: run the same paddock version on both machines",
            PROTO.0, PROTO.1, PROTO.2
        ));
    }
    let mut count = vec![CMD_DEVICE_COUNT];
    count.extend_from_slice(&0u64.to_ne_bytes());
    stream.write_all(&count).map_err(io)?;
    let reply = read_reply(&mut stream, 4).map_err(io)?.ok_or_else(busy)?;
    let n = u32::from_ne_bytes([reply[0], reply[1], reply[2], reply[3]]);
    if n == 0 {
        return Err(format!("worker {shown} exposes no devices"));
    }
    Ok(n)
}

/// One reply of `size` bytes; None if the worker announced another size.
fn read_reply(stream: &mut TcpStream, size: usize) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 8];
    stream.read_exact(&mut len)?;
    if u64::from_ne_bytes(len) != size as u64 {
        return Ok(None);
    }
    let mut payload = vec![0u8; size];
    stream.read_exact(&mut payload)?;
    Ok(Some(payload))
}

/// Guards ggml's process-wide device list: registering a worker appends to it (write side);
/// model loads and context creation enumerate it (read side).
pub fn devices_read() -> RwLockReadGuard<'static, ()> {
    device_list_lock().read()
}

fn device_list_lock() -> &'static RwLock<()> {
    static LOCK: RwLock<()> = RwLock::new(());
    &LOCK
}

/// A registered worker: ggml's registry for it (never freed by ggml) and how many loads hold it.
struct Worker {
    #[cfg_attr(not(feature = "rpc"), allow(dead_code))]
    reg: sys::ggml_backend_reg_t,
    leases: usize,
}

// SAFETY: `reg` points to a `ggml_backend_reg` that ggml-rpc allocates once per endpoint and
// never frees; paddock only passes it back to ggml's thread-safe lookups under `WORKERS`' lock.
unsafe impl Send for Worker {}

/// Registered workers by their resolved `ip:port` (ggml's key for its connection).
fn workers() -> &'static Mutex<HashMap<String, Worker>> {
    static WORKERS: OnceLock<Mutex<HashMap<String, Worker>>> = OnceLock::new();
    WORKERS.get_or_init(Default::default)
}

/// Devices of the workers one model load uses. Dropping it releases them: kept inside the
/// loaded weights, after the model, so the count falls when ggml's connection closes.
#[derive(Debug, Default)]
pub struct RpcLease {
    keys: Vec<String>,
    /// ggml device indices, in the order of the instance's `rpc_servers`.
    pub devices: Vec<usize>,
    /// ggml's device name (`RPC0`, …) → the worker as the user wrote it.
    pub names: Vec<(String, String)>,
}

impl Drop for RpcLease {
    fn drop(&mut self) {
        let mut map = workers().lock();
        for key in &self.keys {
            if let Some(w) = map.get_mut(key) {
                w.leases = w.leases.saturating_sub(1);
            }
        }
    }
}

/// Makes the devices of `servers` (as the user wrote them) usable by model loads: resolves each,
/// checks it answers ggml's handshake unless this process already holds a connection to it,
/// registers its devices with ggml once per process, and returns a lease on them.
pub fn attach(servers: &[String]) -> Result<RpcLease, EngineError> {
    let fail = |reason: String| EngineError::Rpc(reason);
    let mut lease = RpcLease::default();
    // One attach at a time: a probe must not race another thread's first connection.
    static ATTACH: Mutex<()> = Mutex::new(());
    let _one = ATTACH.lock();
    for shown in servers {
        let endpoint: RpcEndpoint = shown.parse().map_err(fail)?;
        let addr = endpoint.resolve().map_err(fail)?;
        let key = addr.to_string();
        if lease.keys.contains(&key) {
            return Err(fail(format!("worker {shown} is listed twice in rpc_servers")));
        }
        let held = workers().lock().get(&key).is_some_and(|w| w.leases > 0);
        if !held {
            probe(shown, addr).map_err(fail)?;
        }
        let reg = register(&key).map_err(|e| fail(format!("worker {shown}: {e}")))?;
        workers().lock().entry(key.clone()).or_insert(Worker { reg, leases: 0 }).leases += 1;
        lease.keys.push(key);
        for dev in reg_devices(reg) {
            let index =
                device_index(dev).ok_or_else(|| fail(format!("worker {shown}: its device is not in ggml's list")))?;
            lease.devices.push(index);
            lease.names.push((device_name(dev), shown.clone()));
        }
    }
    Ok(lease)
}

/// ggml's registry for the worker at `key` (`ip:port`), registered on first use.
#[cfg(feature = "rpc")]
fn register(key: &str) -> Result<sys::ggml_backend_reg_t, String> {
    if let Some(w) = workers().lock().get(key) {
        return Ok(w.reg);
    }
    let rpc = rpc_reg()?;
    let name = CString::new("ggml_backend_rpc_add_server").expect("no NUL");
    // SAFETY: `rpc` is ggml's static RPC registry; the name is a valid C string.
    let f = unsafe { sys::ggml_backend_reg_get_proc_address(rpc, name.as_ptr()) };
    if f.is_null() {
        return Err("this llama.cpp's RPC backend has no ggml_backend_rpc_add_server".into());
    }
    type AddServer = unsafe extern "C" fn(*const std::os::raw::c_char) -> sys::ggml_backend_reg_t;
    // SAFETY: ggml-rpc.cpp returns `ggml_backend_rpc_add_server` for this name, whose signature
    // is `ggml_backend_reg_t (const char * endpoint)` in the vendored ggml-rpc.h.
    let add_server: AddServer = unsafe { std::mem::transmute::<*mut std::ffi::c_void, AddServer>(f) };
    let endpoint = CString::new(key).map_err(|_| "NUL in the endpoint".to_string())?;
    let _write = device_list_lock().write();
    // SAFETY: `endpoint` is an `ip:port` ggml's parser accepts and [`probe`] just reached (or this
    // process holds a live connection to it); ggml copies the string. It connects (if not
    // connected) and asks the worker's device count; null = no devices.
    let reg = unsafe { add_server(endpoint.as_ptr()) };
    if reg.is_null() {
        return Err("it exposes no devices".into());
    }
    // SAFETY: `reg` is a registry ggml-rpc allocated for this endpoint and never frees; it is
    // registered once per process (callers hold `ATTACH` and we checked `workers()`), under the
    // device list's write lock so no load enumerates devices meanwhile.
    unsafe { sys::ggml_backend_register(reg) };
    Ok(reg)
}

#[cfg(not(feature = "rpc"))]
fn register(_key: &str) -> Result<sys::ggml_backend_reg_t, String> {
    Err("this paddock was built without the `rpc` feature".into())
}

/// ggml's RPC backend registry (its devices are added per worker).
#[cfg(feature = "rpc")]
fn rpc_reg() -> Result<sys::ggml_backend_reg_t, String> {
    let name = CString::new("RPC").expect("no NUL");
    // SAFETY: a lookup by name in ggml's registry; null when llama.cpp was built without GGML_RPC.
    let reg = unsafe { sys::ggml_backend_reg_by_name(name.as_ptr()) };
    if reg.is_null() {
        Err("the linked llama.cpp was built without GGML_RPC (see .cargo/config.toml)".into())
    } else {
        Ok(reg)
    }
}

fn reg_devices(reg: sys::ggml_backend_reg_t) -> Vec<sys::ggml_backend_dev_t> {
    // SAFETY: `reg` is a live registry (ggml never frees them); indices are below its count.
    unsafe { (0..sys::ggml_backend_reg_dev_count(reg)).map(|i| sys::ggml_backend_reg_dev_get(reg, i)).collect() }
}

/// The index of `dev` in ggml's device list (what `LlamaModelParams::with_devices` takes).
fn device_index(dev: sys::ggml_backend_dev_t) -> Option<usize> {
    // SAFETY: enumerating ggml's device list; callers hold `ATTACH`, and registration (the only
    // writer) happens under that same lock.
    unsafe { (0..sys::ggml_backend_dev_count()).find(|&i| sys::ggml_backend_dev_get(i) == dev) }
}

fn device_name(dev: sys::ggml_backend_dev_t) -> String {
    // SAFETY: `dev` is a live device; ggml returns a NUL-terminated name it owns (for RPC
    // devices a field of the device, no network).
    unsafe { cstr(sys::ggml_backend_dev_name(dev)) }
}

fn cstr(p: *const std::os::raw::c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        // SAFETY: non-null C strings from ggml are NUL-terminated and outlive this call.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

fn is_rpc(dev: sys::ggml_backend_dev_t) -> bool {
    // SAFETY: `dev` is a live device; the registry name is a static string (no network).
    unsafe { cstr(sys::ggml_backend_reg_name(sys::ggml_backend_dev_backend_reg(dev))) == "RPC" }
}

/// Whether this process has registered any worker: then llama.cpp's default device choice
/// (every GPU-type device, RPC ones included) would put every instance's layers on them.
pub fn any_attached() -> bool {
    !workers().lock().is_empty()
}

/// The devices a model load passes to llama.cpp: the lease's workers first (llama-server's
/// `--rpc` order: fewer transfers), then the local devices llama.cpp would pick by default —
/// GPUs without duplicates by device id, integrated GPUs only without a discrete one — never
/// another instance's workers. Call with [`devices_read`] held.
pub fn load_devices(lease: &RpcLease) -> Result<Vec<usize>, EngineError> {
    let mut gpus: Vec<(usize, Option<String>)> = Vec::new();
    let mut igpus: Vec<(usize, sys::ggml_backend_reg_t)> = Vec::new();
    // SAFETY: enumerating ggml's device list under the caller's read lock; `ggml_backend_dev_type`
    // and the registry name need no network for RPC devices, and props are read for local
    // GPUs only (for an RPC device they would query the worker).
    unsafe {
        for i in 0..sys::ggml_backend_dev_count() {
            let dev = sys::ggml_backend_dev_get(i);
            match sys::ggml_backend_dev_type(dev) {
                sys::GGML_BACKEND_DEVICE_TYPE_GPU if !is_rpc(dev) => {
                    let mut props: sys::ggml_backend_dev_props = std::mem::zeroed();
                    sys::ggml_backend_dev_get_props(dev, &mut props);
                    let id = (!props.device_id.is_null()).then(|| cstr(props.device_id));
                    if id.is_none() || !gpus.iter().any(|(_, other)| other == &id) {
                        gpus.push((i, id));
                    }
                }
                sys::GGML_BACKEND_DEVICE_TYPE_IGPU => {
                    let reg = sys::ggml_backend_dev_backend_reg(dev);
                    if igpus.last().is_none_or(|&(_, r)| r == reg) {
                        igpus.push((i, reg));
                    }
                }
                _ => {}
            }
        }
    }
    let mut devices = lease.devices.clone();
    devices.extend(gpus.iter().map(|&(i, _)| i));
    if gpus.is_empty() {
        devices.extend(igpus.iter().map(|&(i, _)| i));
    }
    if devices.len() > MAX_DEVICES {
        return Err(EngineError::Rpc(format!(
            "{} devices (workers' and local GPUs); llama-cpp-2 passes at most {MAX_DEVICES}",
            devices.len()
        )));
    }
    Ok(devices)
}

/// This machine's devices, without the workers' (whose properties would be asked over the
/// network, and whose loss would abort the process): for listings and memory figures.
pub fn local_devices() -> Vec<llama_cpp_2::LlamaBackendDevice> {
    use llama_cpp_2::LlamaBackendDeviceType as Type;
    let _read = devices_read();
    let mut devices = Vec::new();
    // SAFETY: enumerating ggml's device list under the read lock; props are read only for
    // devices that are not RPC ones (those would ask their worker over the network).
    unsafe {
        for index in 0..sys::ggml_backend_dev_count() {
            let dev = sys::ggml_backend_dev_get(index);
            if is_rpc(dev) {
                continue;
            }
            let mut props: sys::ggml_backend_dev_props = std::mem::zeroed();
            sys::ggml_backend_dev_get_props(dev, &mut props);
            devices.push(llama_cpp_2::LlamaBackendDevice {
                index,
                name: cstr(props.name),
                description: cstr(props.description),
                backend: cstr(sys::ggml_backend_reg_name(sys::ggml_backend_dev_backend_reg(dev))),
                memory_total: props.memory_total,
                memory_free: props.memory_free,
                device_type: match props.type_ {
                    sys::GGML_BACKEND_DEVICE_TYPE_CPU => Type::Cpu,
                    sys::GGML_BACKEND_DEVICE_TYPE_ACCEL => Type::Accelerator,
                    sys::GGML_BACKEND_DEVICE_TYPE_GPU => Type::Gpu,
                    sys::GGML_BACKEND_DEVICE_TYPE_IGPU => Type::IntegratedGpu,
                    _ => Type::Unknown,
                },
            });
        }
    }
    devices
}

/// `paddock worker`'s settings.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Where to listen: an IPv4 address (ggml's server binds IPv4 only).
    pub listen: SocketAddrV4,
    /// Where the worker caches tensors clients sent before (by hash), so a reload sends less.
    pub cache_dir: Option<std::path::PathBuf>,
    /// Threads of the CPU device.
    pub threads: usize,
    /// ggml device names to expose (`CPU`, `CUDA0`, …); empty = the accelerators, else the CPU
    /// (what llama.cpp's rpc-server picks).
    pub devices: Vec<String>,
}

/// The devices a worker exposes: the named ones, or every non-CPU device, or else the CPU.
pub fn worker_devices(names: &[String]) -> Result<Vec<(String, String)>, String> {
    Ok(select_worker_devices(names)?.into_iter().map(|d| (device_name(d), device_description(d))).collect())
}

fn device_description(dev: sys::ggml_backend_dev_t) -> String {
    // SAFETY: `dev` is a live local device; ggml owns the returned string.
    unsafe { cstr(sys::ggml_backend_dev_description(dev)) }
}

fn select_worker_devices(names: &[String]) -> Result<Vec<sys::ggml_backend_dev_t>, String> {
    let _read = devices_read();
    let all: Vec<sys::ggml_backend_dev_t> =
        // SAFETY: enumerating ggml's device list under the read lock.
        unsafe { (0..sys::ggml_backend_dev_count()).map(|i| sys::ggml_backend_dev_get(i)).collect() };
    let all: Vec<_> = all.into_iter().filter(|&d| !is_rpc(d)).collect();
    if !names.is_empty() {
        return names
            .iter()
            .map(|n| {
                all.iter().copied().find(|&d| device_name(d).eq_ignore_ascii_case(n)).ok_or_else(|| {
                    let known: Vec<String> = all.iter().map(|&d| device_name(d)).collect();
                    format!("no device named `{n}`; this machine has {}", known.join(", "))
                })
            })
            .collect();
    }
    // SAFETY: `ggml_backend_dev_type` on live local devices.
    let accelerators: Vec<_> = all
        .iter()
        .copied()
        .filter(|&d| unsafe { sys::ggml_backend_dev_type(d) } != sys::GGML_BACKEND_DEVICE_TYPE_CPU)
        .collect();
    if !accelerators.is_empty() {
        return Ok(accelerators);
    }
    // SAFETY: as above.
    Ok(all
        .into_iter()
        .filter(|&d| unsafe { sys::ggml_backend_dev_type(d) } == sys::GGML_BACKEND_DEVICE_TYPE_CPU)
        .take(1)
        .collect())
}

/// Runs ggml's RPC server on this machine's devices. Returns only if it could not start (ggml
/// prints why on stderr): the server loop itself never ends.
#[cfg(feature = "rpc")]
pub fn serve(config: &WorkerConfig) -> Result<(), String> {
    let devices = select_worker_devices(&config.devices)?;
    if devices.is_empty() {
        return Err("this machine has no device to expose".into());
    }
    let rpc = rpc_reg()?;
    let name = CString::new("ggml_backend_rpc_start_server").expect("no NUL");
    // SAFETY: `rpc` is ggml's static RPC registry; the name is a valid C string.
    let f = unsafe { sys::ggml_backend_reg_get_proc_address(rpc, name.as_ptr()) };
    if f.is_null() {
        return Err("this llama.cpp's RPC backend has no ggml_backend_rpc_start_server".into());
    }
    type StartServer = unsafe extern "C" fn(
        *const std::os::raw::c_char,
        *const std::os::raw::c_char,
        usize,
        usize,
        *mut sys::ggml_backend_dev_t,
    );
    // SAFETY: ggml-rpc.cpp returns `ggml_backend_rpc_start_server` for this name, whose signature
    // in the vendored ggml-rpc.h is `void (const char * endpoint, const char * cache_dir,
    // size_t n_threads, size_t n_devices, ggml_backend_dev_t * devices)`.
    let start: StartServer = unsafe { std::mem::transmute::<*mut std::ffi::c_void, StartServer>(f) };
    let endpoint = CString::new(config.listen.to_string()).expect("no NUL in an address");
    let cache_dir = match &config.cache_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|e| format!("cannot create the cache dir {}: {e}", dir.display()))?;
            Some(CString::new(dir.to_string_lossy().as_bytes()).map_err(|_| "NUL in the cache dir".to_string())?)
        }
        None => None,
    };
    let mut devices = devices;
    // SAFETY: `endpoint` is an `a.b.c.d:port` (ggml binds it with `inet_addr`), `cache_dir` null
    // or an existing directory, `devices` live local devices that outlive the call (it never
    // returns once listening). The strings and vector live on this frame across the call.
    unsafe {
        start(
            endpoint.as_ptr(),
            cache_dir.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            config.threads.max(1),
            devices.len(),
            devices.as_mut_ptr(),
        )
    };
    Err(format!("ggml's RPC server could not listen on {} (its message is above)", config.listen))
}

#[cfg(not(feature = "rpc"))]
pub fn serve(_config: &WorkerConfig) -> Result<(), String> {
    Err("this paddock was built without the `rpc` feature".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_or_say_why() {
        let e: RpcEndpoint = "10.0.0.2:50052".parse().unwrap();
        assert_eq!((e.host.as_str(), e.port), ("10.0.0.2", 50052));
        assert_eq!("gpu-box.lan:1".parse::<RpcEndpoint>().unwrap().to_string(), "gpu-box.lan:1");
        assert!("10.0.0.2".parse::<RpcEndpoint>().unwrap_err().contains("not host:port"));
        assert!("[::1]:50052".parse::<RpcEndpoint>().unwrap_err().contains("IPv4 only"));
        assert!("::1:50052".parse::<RpcEndpoint>().unwrap_err().contains("IPv4 only"));
        assert!("h:0".parse::<RpcEndpoint>().unwrap_err().contains("1 to 65535"));
        assert!("h:99999".parse::<RpcEndpoint>().unwrap_err().contains("1 to 65535"));
        assert!(":50052".parse::<RpcEndpoint>().unwrap_err().contains("not an IPv4 address or a host name"));
        assert!("a b:1".parse::<RpcEndpoint>().unwrap_err().contains("not an IPv4 address or a host name"));
        let json: RpcEndpoint = serde_json::from_str("\"127.0.0.1:50052\"").unwrap();
        assert_eq!(serde_json::to_string(&json).unwrap(), "\"127.0.0.1:50052\"");
    }

    #[test]
    fn a_closed_port_is_not_reachable() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let err = probe("w:1", SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, port)).unwrap_err();
        assert!(err.starts_with("worker w:1 is not reachable"), "{err}");
    }

    #[test]
    fn a_silent_listener_is_reported_as_busy_or_foreign() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = match listener.local_addr().unwrap() {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(_) => unreachable!(),
        };
        let started = std::time::Instant::now();
        let err = probe_within("w:2", addr, Duration::from_millis(300)).unwrap_err();
        assert!(err.contains("did not answer ggml's RPC handshake"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(3));
    }
}
