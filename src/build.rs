//! Build information recorded by `build.rs`.

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const GIT_REVISION: &str = env!("PADDOCK_GIT_REVISION");
const BUILD_UNIX: &str = env!("PADDOCK_BUILD_UNIX");

/// Build time as RFC 3339.
pub fn build_time() -> String {
    let secs = BUILD_UNIX.parse::<i64>().unwrap_or(0);
    chrono::DateTime::from_timestamp(secs, 0).map(|t| t.to_rfc3339()).unwrap_or_default()
}

/// OpenAI's `system_fingerprint`: which build produced a response.
pub fn fingerprint() -> &'static str {
    concat!("paddock-", env!("CARGO_PKG_VERSION"), "-", env!("PADDOCK_GIT_REVISION"))
}

/// `paddock --version`.
pub fn long_version() -> &'static str {
    concat!(env!("CARGO_PKG_VERSION"), " (", env!("PADDOCK_GIT_REVISION"), ", built ", env!("PADDOCK_BUILD_UNIX"), ")")
}

/// The llama.cpp bindings paddock links (pinned exactly in Cargo.toml).
pub const LLAMA_CPP_2: &str = "0.1.160";

/// The cargo features this binary was built with.
pub const FEATURES: &[&str] = &[
    #[cfg(feature = "cuda")]
    "cuda",
    #[cfg(feature = "metal")]
    "metal",
    #[cfg(feature = "vulkan")]
    "vulkan",
];
