//! Turning token pieces into text a client may see.
//!
//! Two concerns sit between a sampled token and a streamed delta, both per slot and both pure:
//! - [`Utf8Assembler`]: a token's piece is bytes, and a character may be split across tokens
//!   (emoji, CJK under byte-fallback vocabularies). Only whole characters leave the assembler.
//! - [`StopMatcher`]: a stop string may be split across tokens. Text that could still become the
//!   start of a stop string is held back until it cannot, so a stop string is never emitted, not
//!   even partly.
//!
//! Both reuse their buffers across tokens: no allocation per token beyond the text handed out.

/// Collects piece bytes and releases the longest valid UTF-8 prefix.
#[derive(Debug, Default)]
pub struct Utf8Assembler {
    pending: Vec<u8>,
}

impl Utf8Assembler {
    /// Appends `bytes` and pushes every complete character onto `out`. Invalid sequences (which a
    /// well-formed vocabulary does not produce) become U+FFFD rather than stalling the stream.
    pub fn push(&mut self, bytes: &[u8], out: &mut String) {
        self.pending.extend_from_slice(bytes);
        let mut start = 0;
        loop {
            match std::str::from_utf8(&self.pending[start..]) {
                Ok(text) => {
                    out.push_str(text);
                    start = self.pending.len();
                    break;
                }
                Err(err) => {
                    let valid = start + err.valid_up_to();
                    // SAFETY-free: from_utf8 just told us this range is valid.
                    out.push_str(std::str::from_utf8(&self.pending[start..valid]).unwrap_or_default());
                    match err.error_len() {
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            start = valid + bad;
                        }
                        // An incomplete character at the end: wait for the next piece.
                        None => {
                            start = valid;
                            break;
                        }
                    }
                }
            }
        }
        self.pending.drain(..start);
    }

    /// Releases whatever is left at the end of a generation (an unfinished character becomes U+FFFD).
    pub fn finish(&mut self, out: &mut String) {
        if !self.pending.is_empty() {
            out.push_str(&String::from_utf8_lossy(&self.pending));
            self.pending.clear();
        }
    }

    pub fn clear(&mut self) {
        self.pending.clear();
    }
}

/// What [`StopMatcher::push`] decided about the text seen so far.
#[derive(Debug, PartialEq, Eq)]
pub enum StopOutcome {
    /// Keep generating; the text released (possibly empty) is safe to send.
    Continue,
    /// A stop string matched; the text released is everything before it. Generation ends.
    Stopped,
}

/// Holds back text that may be the beginning of a stop string.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    /// Index in `stops` of the string that matched.
    matched: Option<usize>,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        let stops = stops.into_iter().filter(|s| !s.is_empty()).collect();
        Self { stops, held: String::new(), matched: None }
    }

    /// Feeds newly decoded `text`; appends what may be sent to `out`.
    ///
    /// A stop string cannot begin inside text already released, because any suffix that is a
    /// prefix of a stop string is held; so searching the held text alone is enough.
    pub fn push(&mut self, text: &str, out: &mut String) -> StopOutcome {
        if self.stops.is_empty() {
            out.push_str(text);
            return StopOutcome::Continue;
        }
        self.held.push_str(text);
        let first_match =
            self.stops.iter().enumerate().filter_map(|(i, s)| self.held.find(s.as_str()).map(|at| (at, i))).min();
        if let Some((at, i)) = first_match {
            self.matched = Some(i);
            out.push_str(&self.held[..at]);
            self.held.clear();
            return StopOutcome::Stopped;
        }
        let keep = self.longest_partial_suffix();
        let release = self.held.len() - keep;
        out.push_str(&self.held[..release]);
        self.held.drain(..release);
        StopOutcome::Continue
    }

    /// The stop string that ended the generation, if one did.
    pub fn matched(&self) -> Option<&str> {
        self.matched.map(|i| self.stops[i].as_str())
    }

    /// Releases held text at the end of a generation that did not stop on a stop string.
    pub fn finish(&mut self, out: &mut String) {
        out.push_str(&self.held);
        self.held.clear();
    }

    /// Length in bytes of the longest suffix of the held text that is a proper prefix of a stop
    /// string (always on a char boundary, since stop strings are valid UTF-8).
    fn longest_partial_suffix(&self) -> usize {
        let held = self.held.as_str();
        let mut best = 0;
        for stop in &self.stops {
            let max = (stop.len() - 1).min(held.len());
            for len in (best + 1..=max).rev() {
                let start = held.len() - len;
                if held.is_char_boundary(start) && stop.as_bytes().starts_with(&held.as_bytes()[start..]) {
                    best = len;
                    break;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_all(asm: &mut Utf8Assembler, chunks: &[&[u8]]) -> Vec<String> {
        chunks
            .iter()
            .map(|c| {
                let mut out = String::new();
                asm.push(c, &mut out);
                out
            })
            .collect()
    }

    #[test]
    fn split_character_is_released_whole() {
        let euro = "€".as_bytes(); // 3 bytes
        let mut asm = Utf8Assembler::default();
        let outs = feed_all(&mut asm, &[b"a", &euro[..1], &euro[1..2], &euro[2..], b"b"]);
        assert_eq!(outs, vec!["a", "", "", "€", "b"]);
    }

    #[test]
    fn emoji_split_over_two_pieces_with_text_around() {
        let smile = "😀".as_bytes(); // 4 bytes
        let mut first = b"hi ".to_vec();
        first.extend_from_slice(&smile[..2]);
        let mut second = smile[2..].to_vec();
        second.extend_from_slice(b"!");
        let mut asm = Utf8Assembler::default();
        assert_eq!(feed_all(&mut asm, &[&first, &second]), vec!["hi ", "😀!"]);
    }

    #[test]
    fn invalid_bytes_become_replacement_and_stream_continues() {
        let mut asm = Utf8Assembler::default();
        assert_eq!(feed_all(&mut asm, &[b"a\xffb"]), vec!["a\u{FFFD}b"]);
    }

    #[test]
    fn unfinished_character_is_flushed_lossily_at_finish() {
        let mut asm = Utf8Assembler::default();
        let mut out = String::new();
        asm.push(&"€".as_bytes()[..2], &mut out);
        assert_eq!(out, "");
        asm.finish(&mut out);
        assert_eq!(out, "\u{FFFD}");
    }

    fn run_stop(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            if m.push(p, &mut out) == StopOutcome::Stopped {
                return (out, true);
            }
        }
        m.finish(&mut out);
        (out, false)
    }

    #[test]
    fn stop_split_across_pieces_is_never_emitted() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        let mut out = String::new();
        assert_eq!(m.push("hello E", &mut out), StopOutcome::Continue);
        assert_eq!(out, "hello ", "the possible start of the stop string is held back");
        assert_eq!(m.push("N", &mut out), StopOutcome::Continue);
        assert_eq!(out, "hello ");
        assert_eq!(m.push("D and more", &mut out), StopOutcome::Stopped);
        assert_eq!(out, "hello ");
    }

    #[test]
    fn false_start_is_released() {
        assert_eq!(run_stop(&["END"], &["E", "N", "X"]), ("ENX".to_string(), false));
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        assert_eq!(run_stop(&["bb", "a"], &["xxbba"]), ("xx".to_string(), true));
        assert_eq!(run_stop(&["\n\n", "User:"], &["one\n", "\nUser:"]), ("one".to_string(), true));
    }

    #[test]
    fn no_stops_passes_through() {
        assert_eq!(run_stop(&[], &["a", "b"]), ("ab".to_string(), false));
    }

    #[test]
    fn multibyte_stop_strings_hold_on_char_boundaries() {
        assert_eq!(run_stop(&["é!"], &["caf", "é", "!"]), ("caf".to_string(), true));
        assert_eq!(run_stop(&["éé"], &["xé", "y"]), ("xéy".to_string(), false));
    }
}
