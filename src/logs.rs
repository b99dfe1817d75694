//! Per-instance log buffers, fed by llama.cpp's log callback and by lifecycle events.
//!
//! llama.cpp's log callback is process-wide. `llama-cpp-2` turns each line into a `tracing`
//! event emitted on the thread that called into llama.cpp, which for an instance is always its
//! engine thread. So the engine thread registers its instance's buffer in a thread-local, and
//! [`InstanceLogLayer`] appends every event of that thread to it.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use serde::Serialize;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::Layer;

/// Lines kept per instance; older ones are dropped.
pub const LOG_CAPACITY: usize = 2000;

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct LogLine {
    pub timestamp: DateTime<Utc>,
    pub level: &'static str,
    pub message: String,
}

/// A bounded ring buffer of log lines, plus a broadcast of new lines for followers. Its lock is
/// held only to push or copy lines.
#[derive(Debug)]
pub struct LogBuffer {
    lines: Mutex<VecDeque<LogLine>>,
    follow: tokio::sync::broadcast::Sender<LogLine>,
}

impl Default for LogBuffer {
    fn default() -> Self {
        LogBuffer { lines: Mutex::new(VecDeque::new()), follow: tokio::sync::broadcast::channel(1024).0 }
    }
}

impl LogBuffer {
    pub fn push(&self, level: Level, message: impl Into<String>) {
        let line = LogLine { timestamp: Utc::now(), level: level_name(level), message: message.into() };
        let mut lines = self.lines.lock();
        if lines.len() == LOG_CAPACITY {
            lines.pop_front();
        }
        // Sent under the lock so a follower that subscribed while copying the tail sees each
        // line exactly once.
        let _ = self.follow.send(line.clone());
        lines.push_back(line);
    }

    /// The last `n` lines (as [`LogBuffer::tail`]) and a receiver of every line pushed after them.
    pub fn follow(
        &self,
        n: usize,
        min_level: Option<Level>,
    ) -> (Vec<LogLine>, tokio::sync::broadcast::Receiver<LogLine>) {
        let lines = self.lines.lock();
        let rx = self.follow.subscribe();
        (Self::tail_of(&lines, n, min_level), rx)
    }

    /// The last `n` lines at or above `min_level`, oldest first.
    pub fn tail(&self, n: usize, min_level: Option<Level>) -> Vec<LogLine> {
        Self::tail_of(&self.lines.lock(), n, min_level)
    }

    fn tail_of(lines: &VecDeque<LogLine>, n: usize, min_level: Option<Level>) -> Vec<LogLine> {
        let keep = |l: &&LogLine| at_least(l, min_level);
        let mut out: Vec<LogLine> = lines.iter().rev().filter(keep).take(n).cloned().collect();
        out.reverse();
        out
    }
}

fn level_name(level: Level) -> &'static str {
    match level {
        Level::ERROR => "error",
        Level::WARN => "warn",
        Level::INFO => "info",
        Level::DEBUG => "debug",
        Level::TRACE => "trace",
    }
}

/// Whether `line` is at or above `min_level`.
pub fn at_least(line: &LogLine, min_level: Option<Level>) -> bool {
    min_level.is_none_or(|min| level_rank(line.level) >= level_rank(level_name(min)))
}

fn level_rank(name: &str) -> u8 {
    match name {
        "error" => 4,
        "warn" => 3,
        "info" => 2,
        "debug" => 1,
        _ => 0,
    }
}

thread_local! {
    static SINK: RefCell<Option<Arc<LogBuffer>>> = const { RefCell::new(None) };
}

/// Routes this thread's events to `buffer` until the thread ends. Called once by an engine thread.
pub fn route_thread_to(buffer: Arc<LogBuffer>) {
    SINK.with(|s| *s.borrow_mut() = Some(buffer));
}

/// Appends events of threads that called [`route_thread_to`] to their instance's buffer.
pub struct InstanceLogLayer;

impl<S: Subscriber> Layer<S> for InstanceLogLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        SINK.with(|sink| {
            let sink = sink.borrow();
            let Some(buffer) = sink.as_ref() else { return };
            let mut visitor = MessageVisitor::default();
            event.record(&mut visitor);
            let message = visitor.message.trim_end();
            if !message.is_empty() {
                buffer.push(*event.metadata().level(), message);
            }
        });
    }
}

thread_local! {
    static CAPTURE: RefCell<Option<Vec<String>>> = const { RefCell::new(None) };
}

/// Runs `f` and returns, with its result, the llama.cpp log lines (debug ones included) this
/// thread emitted meanwhile: llama.cpp reports some facts, such as which device each layer went
/// to, only in its log.
pub fn capture_llama_lines<T>(f: impl FnOnce() -> T) -> (T, Vec<String>) {
    CAPTURE.with(|c| *c.borrow_mut() = Some(Vec::new()));
    let out = f();
    let lines = CAPTURE.with(|c| c.borrow_mut().take()).unwrap_or_default();
    (out, lines)
}

/// Collects llama.cpp's events for [`capture_llama_lines`]; does nothing on threads not capturing.
pub struct CaptureLayer;

impl<S: Subscriber> Layer<S> for CaptureLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        CAPTURE.with(|capture| {
            if let Some(lines) = capture.borrow_mut().as_mut() {
                let mut visitor = MessageVisitor::default();
                event.record(&mut visitor);
                lines.push(visitor.message.trim_end().to_string());
            }
        });
    }
}

#[derive(Default)]
struct MessageVisitor {
    message: String,
}

impl Visit for MessageVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else if field.name() != "module" {
            let _ = write!(self.message, " {}={}", field.name(), value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else if field.name() != "module" {
            let _ = write!(self.message, " {}={:?}", field.name(), value);
        }
    }
}

/// Installs the process's tracing subscriber: console output filtered by `RUST_LOG` (or
/// `default_console`), and [`InstanceLogLayer`], which wants llama.cpp's info lines even when the
/// console does not. Does nothing if a subscriber is already installed.
pub fn init_tracing(default_console: &str) {
    use tracing_subscriber::filter::{EnvFilter, Targets};
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let console = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_console));
    let instance = Targets::new().with_target("llama-cpp-2", Level::INFO).with_target("paddock", Level::INFO);
    // A static per-target filter: other crates' debug events stay disabled at their call site.
    let capture = Targets::new().with_target("llama-cpp-2", Level::DEBUG);
    let _ = tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_filter(console))
        .with(InstanceLogLayer.with_filter(instance))
        .with(CaptureLayer.with_filter(capture))
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_buffer_keeps_the_newest_and_filters_by_level() {
        let buf = LogBuffer::default();
        for i in 0..LOG_CAPACITY + 5 {
            buf.push(if i % 2 == 0 { Level::INFO } else { Level::WARN }, format!("line {i}"));
        }
        let all = buf.tail(usize::MAX, None);
        assert_eq!(all.len(), LOG_CAPACITY);
        assert_eq!(all.last().unwrap().message, format!("line {}", LOG_CAPACITY + 4));
        let warns = buf.tail(3, Some(Level::WARN));
        assert_eq!(warns.len(), 3);
        assert!(warns.iter().all(|l| l.level == "warn"));
        assert_eq!(warns.last().unwrap().message, format!("line {}", LOG_CAPACITY + 3));
    }
}
