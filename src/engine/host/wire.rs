//! What paddock and an instance process say to each other over the child's stdin and stdout:
//! frames of a little-endian `u32` length and a CBOR value. CBOR because it is self-describing
//! (serde attributes such as `skip_serializing_if` work) and keeps floats exact, −∞ included
//! (a banned token's logit bias, a log-probability).

use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::super::{
    EngineConfig, EngineError, Embeddings, GenerateRequest, LoraSpec, ModelInfo, Prompt, SlotAction,
    SlotActionReport, SlotView, StatsSnapshot, StreamEvent, TokenPiece,
};

/// A frame larger than this is a broken stream, not a message (the largest real ones are a
/// long prompt's tokens or a batch of embeddings).
const MAX_FRAME: usize = 1 << 30;

/// Parent → instance process. The first frame is `Start`; `id`s are the parent's, unique per
/// process.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum ToHost {
    Start(Box<EngineConfig>),
    Generate { id: u64, request: Box<GenerateRequest> },
    /// The client went away: drop the request (its slot is freed at the next step).
    Cancel { id: u64 },
    Ping { id: u64 },
    Tokenize { id: u64, text: String, add_special: bool, parse_special: bool },
    Detokenize { id: u64, tokens: Vec<i32> },
    Slots { id: u64 },
    Slot { id: u64, slot: u32, action: SlotAction },
    Lora { id: u64, set: Option<Vec<(u32, f32)>> },
    Embed { id: u64, inputs: Vec<Prompt> },
    Shutdown { save_kv: bool },
}

/// Instance process → parent.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum FromHost {
    /// The answer to `Start`: loaded, or why not.
    Ready(Result<WireInfo, EngineError>),
    /// One of a generation's events; the last one is `Done` or an error.
    Event { id: u64, event: Result<StreamEvent, EngineError> },
    Reply { id: u64, reply: Reply },
    Stats(StatsSnapshot),
    /// A line of the engine's log (llama.cpp's lines included).
    Log { level: String, message: String },
    /// The engine thread ended, and why; the process exits next.
    Exited(Result<(), String>),
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Reply {
    Pong,
    Tokens(Vec<TokenPiece>),
    Text(String),
    Slots(Vec<SlotView>),
    Slot(Result<SlotActionReport, EngineError>),
    Lora(Result<Vec<LoraSpec>, EngineError>),
    Embeddings(Result<Embeddings, EngineError>),
}

/// [`ModelInfo`] with the fields its API form leaves out.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct WireInfo {
    info: ModelInfo,
    chat_template: Option<String>,
    bos_token: String,
    eos_token: String,
    add_bos: bool,
    bos_id: i32,
    fim: Option<[i32; 3]>,
}

impl From<ModelInfo> for WireInfo {
    fn from(info: ModelInfo) -> Self {
        WireInfo {
            chat_template: info.chat_template.clone(),
            bos_token: info.bos_token.clone(),
            eos_token: info.eos_token.clone(),
            add_bos: info.add_bos,
            bos_id: info.bos_id,
            fim: info.fim,
            info,
        }
    }
}

impl From<WireInfo> for ModelInfo {
    fn from(w: WireInfo) -> Self {
        ModelInfo {
            chat_template: w.chat_template,
            bos_token: w.bos_token,
            eos_token: w.eos_token,
            add_bos: w.add_bos,
            bos_id: w.bos_id,
            fim: w.fim,
            ..w.info
        }
    }
}

/// Encodes one frame (length prefix included).
pub(crate) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut frame = vec![0u8; 4];
    // Writing CBOR into a Vec fails only for values serde cannot represent, which ours are not.
    ciborium::into_writer(value, &mut frame).expect("CBOR encoding of a wire message");
    let len = (frame.len() - 4) as u32;
    frame[..4].copy_from_slice(&len.to_le_bytes());
    frame
}

/// Decodes a frame's body (without its length prefix).
pub(crate) fn decode<T: DeserializeOwned>(body: &[u8]) -> io::Result<T> {
    ciborium::from_reader(body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
}

/// The body length a frame's prefix announces, refused past [`MAX_FRAME`].
pub(crate) fn body_len(prefix: [u8; 4]) -> io::Result<usize> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("frame of {len} bytes")));
    }
    Ok(len)
}

/// Reads one frame from a blocking reader; `None` at a clean end of stream.
pub(crate) fn read_blocking<T: DeserializeOwned>(r: &mut impl Read) -> io::Result<Option<T>> {
    let mut prefix = [0u8; 4];
    match r.read_exact(&mut prefix) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut body = vec![0u8; body_len(prefix)?];
    r.read_exact(&mut body)?;
    decode(&body).map(Some)
}

/// Writes one frame to a blocking writer (not flushed).
pub(crate) fn write_blocking<T: Serialize>(w: &mut impl Write, value: &T) -> io::Result<()> {
    w.write_all(&encode(value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{FinishReason, TokenProbs, Usage};

    #[test]
    fn events_round_trip_with_infinite_floats() {
        let event = FromHost::Event {
            id: 7,
            event: Ok(StreamEvent::Token {
                text: "é".into(),
                id: 42,
                probs: Some(Box::new(TokenProbs {
                    logprob: f32::NEG_INFINITY,
                    bytes: vec![0xc3],
                    top: vec![(1, vec![0xa9], -0.5)],
                })),
            }),
        };
        let frame = encode(&event);
        let mut reader = &frame[..];
        let back: FromHost = read_blocking(&mut reader).unwrap().unwrap();
        match back {
            FromHost::Event { id: 7, event: Ok(StreamEvent::Token { text, id: 42, probs: Some(p) }) } => {
                assert_eq!(text, "é");
                assert_eq!(p.logprob, f32::NEG_INFINITY);
                assert_eq!(p.top[0].1, vec![0xa9]);
            }
            other => panic!("unexpected {other:?}"),
        }
        let done = FromHost::Event {
            id: 1,
            event: Ok(StreamEvent::Done {
                finish_reason: FinishReason::Length,
                usage: Usage { prompt_tokens: 3, ..Default::default() },
                stop_word: None,
                slot: 0,
            }),
        };
        let back: FromHost = read_blocking(&mut &encode(&done)[..]).unwrap().unwrap();
        assert!(matches!(back, FromHost::Event { event: Ok(StreamEvent::Done { .. }), .. }));
    }

    #[test]
    fn a_truncated_or_oversized_frame_is_an_error_not_a_message() {
        let frame = encode(&ToHost::Ping { id: 1 });
        assert!(read_blocking::<ToHost>(&mut &frame[..frame.len() - 1]).is_err());
        assert!(read_blocking::<ToHost>(&mut &[][..]).unwrap().is_none());
        assert!(body_len((MAX_FRAME as u32 + 1).to_le_bytes()).is_err());
    }
}
