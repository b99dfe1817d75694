//! The `paddock` command line: parse, load config, call into the library.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use paddock::config::{Config, Overrides};
use paddock::instance::{InstanceError, InstanceOptions, InstanceSpec, ModelSource, Policy, StopMode};
use paddock::AppState;
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(name = "paddock", version = paddock::build::VERSION, long_version = long_version(), about = "Serve local LLMs in-process with llama.cpp: many model instances behind one HTTP port")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP server (management API at /api, OpenAI-compatible API at /v1).
    Serve(ServeArgs),
    /// Load-test OpenAI-compatible servers (paddock, llama-server, …) side by side: TTFT,
    /// inter-token latency, throughput, as a table, JSON and an SVG plot.
    Bench(paddock::bench::BenchArgs),
    /// Runs one instance's engine for a parent paddock (isolation "process"), speaking its
    /// protocol on stdin and stdout. Not for direct use.
    #[command(hide = true)]
    InstanceHost,
    /// Lend this machine's devices (CPU, GPUs of GPU builds) to other paddocks' instances over
    /// llama.cpp's RPC protocol: they name it in their `rpc_servers`. Runs until killed.
    #[cfg(feature = "rpc")]
    Worker(WorkerArgs),
}

#[cfg(feature = "rpc")]
#[derive(Parser)]
struct WorkerArgs {
    /// IPv4 address to listen on. Anything but loopback needs --allow-remote.
    #[arg(long, default_value = "127.0.0.1")]
    host: std::net::Ipv4Addr,
    #[arg(long, default_value_t = 50052)]
    port: u16,
    /// Keep tensors clients sent (by hash) here, so a model loads faster the next time.
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Threads of the CPU device [default: physical cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Devices to expose by ggml name, comma-separated (e.g. CUDA0,CPU) [default: every GPU,
    /// else the CPU].
    #[arg(long, value_delimiter = ',')]
    devices: Vec<String>,
    /// Listen on a non-loopback address. ggml's RPC protocol has no authentication and no
    /// encryption: anyone who reaches the port can run computations and read what is sent.
    #[arg(long)]
    allow_remote: bool,
}

#[derive(Parser)]
struct ServeArgs {
    /// YAML config file (keys: host, port, data_dir). Environment variables and flags override it.
    #[arg(long, env = "PADDOCK_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1].
    #[arg(long, env = "PADDOCK_HOST")]
    host: Option<IpAddr>,
    /// Port to listen on [default: 8080].
    #[arg(long, env = "PADDOCK_PORT")]
    port: Option<u16>,
    /// Where paddock keeps its state [default: the platform's user data dir, e.g. ~/.local/share/paddock].
    #[arg(long, env = "PADDOCK_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Creates the admin user (auth.admin_username, default `admin`) with this password if it does
    /// not exist yet; auth is on from then on. Prefer the environment variable to the flag.
    #[arg(long, env = "PADDOCK_ADMIN_PASSWORD", hide_env_values = true)]
    admin_password: Option<String>,
    /// The Hugging Face hub (or a mirror) to search and download models from [default: https://huggingface.co].
    #[arg(long, env = "HF_ENDPOINT")]
    hf_endpoint: Option<String>,
    /// A hub token for gated or private repositories. Prefer the environment variable to the flag.
    #[arg(long, env = "HF_TOKEN", hide_env_values = true)]
    hf_token: Option<String>,
    /// This node's name in the config's `nodes` (llamactl's `local_node`) [default: main].
    #[arg(long, env = "PADDOCK_LOCAL_NODE")]
    local_node: Option<String>,
    /// A GGUF file to serve at once: creates and starts an instance for it, as `llama-server -m` would.
    #[arg(long, short = 'm')]
    model: Option<PathBuf>,
    /// Name of the --model instance (the `model` clients send) [default: the file's name without .gguf].
    #[arg(long, requires = "model")]
    model_name: Option<String>,
    /// Context size of the --model instance, shared by its slots [default: 4096 per slot].
    #[arg(long, requires = "model")]
    ctx_size: Option<u32>,
    /// Parallel slots of the --model instance [default: 4].
    #[arg(long, requires = "model")]
    parallel: Option<u32>,
    /// CPU threads of the --model instance [default: physical cores].
    #[arg(long, requires = "model")]
    threads: Option<u32>,
    /// Serve /v1/embeddings from the --model instance too (llama-server's --embeddings).
    #[arg(long, requires = "model")]
    embeddings: bool,
}

fn long_version() -> &'static str {
    let secs = env!("PADDOCK_BUILD_UNIX").parse::<i64>().unwrap_or(0);
    let built = chrono::DateTime::from_timestamp(secs, 0).map(|t| t.to_rfc3339()).unwrap_or_default();
    Box::leak(
        format!("{} (git {}, built {built})", paddock::build::VERSION, paddock::build::GIT_REVISION).into_boxed_str(),
    )
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The benchmark prints its table on stdout; only warnings may join it. Its swap scenario
    // loads models in-process, whose llama.cpp load warnings are not the benchmark's.
    let default_log = match cli.command {
        Command::Bench(_) => "warn,llama-cpp-2=error",
        // Its log lines travel to the parent as messages; stderr keeps only what bypasses
        // tracing (llama.cpp's abort message).
        Command::InstanceHost => "off",
        Command::Serve(_) => "info,llama-cpp-2=warn",
        #[cfg(feature = "rpc")]
        Command::Worker(_) => "info,llama-cpp-2=warn",
    };
    paddock::logs::init_tracing(default_log);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("paddock: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Serve(args) => runtime.block_on(serve(args)),
        Command::Bench(args) => runtime.block_on(paddock::bench::run(args)).map_err(|e| format!("bench: {e}")),
        Command::InstanceHost => runtime.block_on(paddock::engine::host::child::run()),
        #[cfg(feature = "rpc")]
        Command::Worker(args) => worker(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("paddock: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> Result<(), String> {
    let overrides = Overrides {
        host: args.host,
        port: args.port,
        data_dir: args.data_dir.clone(),
        admin_password: args.admin_password.clone(),
        hf_endpoint: args.hf_endpoint.clone(),
        hf_token: args.hf_token.clone(),
        local_node: args.local_node.clone(),
    };
    let (config, config_path) = Config::load(args.config.as_deref(), overrides).map_err(|e| e.to_string())?;
    let addr = SocketAddr::new(config.host, config.port);
    let listener = TcpListener::bind(addr).await.map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let state = AppState::open(config, config_path)?;
    if state.auth.active() {
        tracing::info!("auth is on: requests need a login token or an API key");
    } else {
        tracing::info!("auth is off (loopback, no users or keys); PADDOCK_ADMIN_PASSWORD turns it on");
    }
    tracing::info!("paddock {} listening on http://{}", paddock::build::VERSION, listener.local_addr().unwrap_or(addr));

    if let Some(model_path) = args.model {
        let name = args.model_name.unwrap_or_else(|| {
            model_path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into())
        });
        let options = InstanceOptions {
            context_size: args.ctx_size,
            parallel: args.parallel,
            threads: args.threads,
            embeddings: args.embeddings.then_some(true),
            ..Default::default()
        };
        // The instance persists like any other; on a later run with the same --model it is reused.
        let spec = InstanceSpec {
            name: name.clone(),
            source: ModelSource::Path { model_path },
            port: None,
            options,
            policy: Policy::default(),
        };
        match state.registry.create(spec).await {
            Ok(_) => {}
            Err(InstanceError::AlreadyExists(_)) => {
                tracing::info!("instance '{name}' exists already; keeping its stored configuration");
            }
            Err(e) => return Err(e.to_string()),
        }
        if let Err(e) = state.registry.start(&name).await {
            if !matches!(e, InstanceError::Transition { .. }) {
                return Err(e.to_string());
            }
        }
        tracing::info!(
            "instance '{name}' starting; chat with it as model \"{name}\" at http://{addr}/v1/chat/completions"
        );
    }

    let registry = state.registry.clone();
    let shutdown = async move {
        shutdown_signal().await;
        tracing::info!("shutting down: stopping instances");
        registry.stop_all(StopMode::default()).await;
    };
    paddock::serve(listener, state, shutdown).await.map_err(|e| e.to_string())
}

/// `paddock worker`: ggml's RPC server, in the foreground until killed.
#[cfg(feature = "rpc")]
fn worker(args: WorkerArgs) -> Result<(), String> {
    use paddock::engine::rpc;
    if !args.host.is_loopback() {
        if !args.allow_remote {
            return Err(format!(
                "worker: {} is not a loopback address; ggml's RPC protocol has no authentication and no encryption, \
                 so listening beyond this machine needs --allow-remote (on a private network, or use an SSH tunnel)",
                args.host
            ));
        }
        tracing::warn!(
            "worker listening on {}: ggml's RPC protocol has NO authentication and NO encryption; anyone who reaches \
             this port can use this machine's devices and read the model data sent. Expose it on a private network only.",
            args.host
        );
    }
    // Initializes llama.cpp and its log forwarding, as an instance would.
    paddock::engine::backend().map_err(|e| e.to_string())?;
    let config = rpc::WorkerConfig {
        listen: std::net::SocketAddrV4::new(args.host, args.port),
        cache_dir: args.cache_dir,
        threads: args.threads.unwrap_or_else(|| num_cpus::get_physical().max(1)),
        devices: args.devices,
    };
    let devices = rpc::worker_devices(&config.devices)?;
    let shown: Vec<String> = devices.iter().map(|(name, description)| format!("{name} ({description})")).collect();
    tracing::info!(
        "paddock {} worker on {}: devices {}; instances use it with \"rpc_servers\": [\"{}\"]",
        paddock::build::VERSION,
        config.listen,
        shown.join(", "),
        config.listen
    );
    rpc::serve(&config).map_err(|e| format!("worker: {e}"))
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
