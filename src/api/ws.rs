//! `/api/ws`: live events as `{"type","timestamp","data"}` text messages.
//!
//! Each connection reads the registry's broadcast of events and, every 2 s, the stats of the
//! running instances. A client that reads slowly never slows anything else: the broadcast keeps
//! a bounded backlog per receiver, and one that falls behind loses the oldest events and is sent
//! `{"type":"lagged"}` to refetch. A client whose socket stays blocked for longer than
//! [`SEND_TIMEOUT`] is disconnected.

use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use chrono::Utc;
use futures::{Sink, SinkExt, Stream, StreamExt};
use serde_json::{json, Value};
use tokio::sync::broadcast::{self, error::RecvError};
use tokio_util::sync::CancellationToken;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::ApiError;
use super::AppState;
use crate::instance::{RegistryEvent, Status};
use crate::models::download::{DownloadStatus, DownloadView};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(ws)).routes(routes!(admin_ws))
}

/// How often running instances' stats are sent.
const STATS_EVERY: Duration = Duration::from_secs(2);
/// A send blocked this long means the client is gone or not reading: close.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// The subprotocol paddock answers with when the client offers it (a browser that offers
/// subprotocols — e.g. to carry `bearer.<token>` — needs one chosen).
const PROTOCOL: &str = "paddock";

/// Live updates: `instance_status_changed` (`name`, `old_status`, `new_status`),
/// `instance_stats_updated` (each running instance every 2 s), `system_alert` (`level`,
/// `message`, `instance`), `instance_created`, `instance_updated`, `instance_deleted`, and
/// `lagged` (`missed`: events dropped because the client read too slowly; refetch state);
/// `download_progress` (a download as `GET /api/admin/downloads` shows it), `activity_event` when
/// one ends, and `models_changed` when one lands a model.
/// Credentials as everywhere, or as a `bearer.<token>` subprotocol, or a `token` query parameter.
#[utoipa::path(get, path = "/ws", tag = "system",
    params(("token" = Option<String>, Query, description = "Credential, for clients that cannot set headers")),
    responses((status = 101, description = "Switching to the WebSocket protocol"),
        (status = 400, description = "Not a WebSocket handshake (`NOT_A_WEBSOCKET`)", body = super::doc::ErrorBody),
        (status = 405, description = "Not a GET (`NOT_A_WEBSOCKET`)", body = super::doc::ErrorBody),
        (status = 426, description = "Upgrade required (`NOT_A_WEBSOCKET`)", body = super::doc::ErrorBody),
        (status = 401, body = super::doc::ErrorBody)))]
async fn ws(
    State(state): State<AppState>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let upgrade = upgrade.map_err(|r| {
        ApiError::new(r.status(), "NOT_A_WEBSOCKET", "Not a WebSocket handshake").with_details(r.body_text())
    })?;
    Ok(upgrade.protocols([PROTOCOL]).on_upgrade(move |socket| run(socket, state)))
}

/// The same live events at the seed's path.
#[utoipa::path(get, path = "/admin/ws", tag = "models", operation_id = "admin_ws",
    params(("token" = Option<String>, Query, description = "Credential, for clients that cannot set headers")),
    responses((status = 101, description = "Switching to the WebSocket protocol"),
        (status = 400, description = "Not a WebSocket handshake (`NOT_A_WEBSOCKET`)", body = super::doc::ErrorBody),
        (status = 405, description = "Not a GET (`NOT_A_WEBSOCKET`)", body = super::doc::ErrorBody),
        (status = 426, description = "Upgrade required (`NOT_A_WEBSOCKET`)", body = super::doc::ErrorBody),
        (status = 401, body = super::doc::ErrorBody)))]
async fn admin_ws(
    state: State<AppState>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    ws(state, upgrade).await
}

async fn run(socket: WebSocket, state: AppState) {
    let (sink, incoming) = socket.split();
    let events = state.registry.subscribe();
    let downloads = state.downloads.subscribe();
    let shutdown = state.shutdown.clone();
    forward(sink, incoming, events, downloads, || stats_messages(&state), shutdown).await
}

/// Sends events, and stats every [`STATS_EVERY`], until the client leaves, a send stays blocked
/// for [`SEND_TIMEOUT`], or the server shuts down.
async fn forward<S, I, E>(
    mut sink: S,
    mut incoming: I,
    mut events: broadcast::Receiver<RegistryEvent>,
    mut downloads: broadcast::Receiver<DownloadView>,
    stats: impl Fn() -> Vec<Value>,
    shutdown: CancellationToken,
) where
    S: Sink<Message> + Unpin,
    I: Stream<Item = Result<Message, E>> + Unpin,
{
    let mut tick = tokio::time::interval(STATS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        let messages: Vec<Value> = tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = tokio::time::timeout(SEND_TIMEOUT, sink.send(Message::Close(None))).await;
                return;
            }
            event = events.recv() => match event {
                Ok(event) => vec![event_message(&event)],
                Err(RecvError::Lagged(missed)) => vec![message("lagged", json!({ "missed": missed }))],
                Err(RecvError::Closed) => return,
            },
            download = downloads.recv() => match download {
                Ok(d) => download_messages(&d),
                // Progress is superseded by the next report; nothing to refetch.
                Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => return,
            },
            _ = tick.tick() => stats(),
            received = incoming.next() => match received {
                // Pings are answered by the protocol layer; a client has nothing else to say.
                Some(Ok(Message::Close(_)) | Err(_)) | None => return,
                Some(Ok(_)) => continue,
            },
        };
        for m in messages {
            let text = Message::Text(Utf8Bytes::from(m.to_string()));
            match tokio::time::timeout(SEND_TIMEOUT, sink.send(text)).await {
                Ok(Ok(())) => {}
                _ => return,
            }
        }
    }
}

fn message(kind: &str, data: Value) -> Value {
    json!({ "type": kind, "timestamp": Utc::now(), "data": data })
}

fn event_message(event: &RegistryEvent) -> Value {
    match event {
        RegistryEvent::Status(c) => {
            let data = json!({ "name": c.name, "old_status": c.old, "new_status": c.status });
            json!({ "type": "instance_status_changed", "timestamp": c.at, "data": data })
        }
        RegistryEvent::Created(name) => message("instance_created", json!({ "name": name })),
        RegistryEvent::Updated(name) => message("instance_updated", json!({ "name": name })),
        RegistryEvent::Deleted(name) => message("instance_deleted", json!({ "name": name })),
        RegistryEvent::Alert(a) => {
            let data = json!({ "level": a.level, "message": a.message, "instance": a.instance });
            json!({ "type": "system_alert", "timestamp": a.time, "data": data })
        }
        RegistryEvent::Scheduler(view) => message("scheduler", json!(view)),
    }
}

/// `download_progress` for every report; when a download ends, the seed's `activity_event`,
/// and `models_changed` if it landed a model.
fn download_messages(d: &DownloadView) -> Vec<Value> {
    let mut out = vec![message("download_progress", json!(d))];
    let (text, level) = match d.status {
        DownloadStatus::Completed => (format!("downloaded {} from {}", d.id, d.repo_id), "success"),
        DownloadStatus::Failed => {
            (format!("download of {} failed: {}", d.id, d.error.as_deref().unwrap_or("unknown error")), "error")
        }
        DownloadStatus::Cancelled => (format!("download of {} cancelled", d.id), "info"),
        _ => return out,
    };
    out.push(message(
        "activity_event",
        json!({ "kind": "download", "model_id": d.id, "message": text, "timestamp": Utc::now(), "toast_level": level }),
    ));
    if d.status == DownloadStatus::Completed {
        out.push(message("models_changed", Value::Null));
    }
    out
}

fn stats_messages(state: &AppState) -> Vec<Value> {
    state
        .registry
        .list()
        .into_iter()
        .filter(|i| i.status == Status::Running)
        .filter_map(|i| {
            let mut data = serde_json::to_value(i.stats?).ok()?;
            data.as_object_mut()?.insert("name".into(), i.name.into());
            Some(message("instance_stats_updated", data))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_client_that_does_not_read_loses_the_oldest_events_and_is_told_so() {
        let (events, rx) = broadcast::channel(4);
        // A sink that takes one message and then blocks until the client reads.
        let (sink, mut client) = futures::channel::mpsc::channel::<Message>(0);
        let incoming = futures::stream::pending::<Result<Message, std::convert::Infallible>>();
        let shutdown = CancellationToken::new();
        let (_downloads, downloads_rx) = broadcast::channel(1);
        let task = tokio::spawn(forward(sink, incoming, rx, downloads_rx, Vec::new, shutdown.clone()));
        for i in 0..20 {
            events.send(RegistryEvent::Created(format!("i{i}"))).unwrap();
            tokio::task::yield_now().await;
        }
        let mut received = Vec::new();
        while let Ok(Some(Message::Text(text))) = tokio::time::timeout(Duration::from_millis(200), client.next()).await
        {
            let v: Value = serde_json::from_str(&text).unwrap();
            received.push(if v["type"] == "lagged" {
                format!("lagged {}", v["data"]["missed"])
            } else {
                v["data"]["name"].as_str().unwrap().to_string()
            });
        }
        let lagged = received.iter().position(|r| r.starts_with("lagged")).expect("told it lagged");
        assert!(received[lagged + 1..].len() <= 4, "at most the backlog after the gap: {received:?}");
        assert_eq!(received.last().unwrap(), "i19", "the newest events survive: {received:?}");
        assert!(!task.is_finished(), "the connection stays open");
        drop(client);
        shutdown.cancel();
        task.await.unwrap();
    }
}
