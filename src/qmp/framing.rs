//! Splits a QMP byte stream into JSON texts the way QEMU's JSON streamer does: a text ends where
//! its outermost `{...}` (or `[...]`) closes, brackets inside strings not counting, so texts need
//! no separator and may span lines. Whitespace between texts is skipped. Anything else between
//! texts (a number, a word, a string) is a stray token, reported once and skipped. A text over
//! [`MAX_MESSAGE`] bytes or nested deeper than [`MAX_DEPTH`] is reported and the rest of it
//! skipped (its nesting still followed, so the next text is found). As QMP's spec says ("Forcing
//! the JSON parser into known-good state"), a byte `0xFF` or a control character other than
//! tab, CR and LF ends whatever was pending with an error, and parsing starts afresh after it.

/// Longest JSON text accepted.
pub const MAX_MESSAGE: usize = 1 << 20;
/// Deepest nesting accepted (QEMU's limit).
pub const MAX_DEPTH: usize = 1024;
/// Longest stray token quoted back in an error.
const MAX_QUOTED: usize = 32;

/// What the framer found.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// One complete JSON text (not yet parsed).
    Text(Vec<u8>),
    /// Input that is not a JSON text, and why.
    Invalid(String),
}

/// Where the framer is in a string.
#[derive(Debug, Default, PartialEq, Eq, Clone, Copy)]
struct Strings {
    inside: bool,
    escaped: bool,
}

impl Strings {
    /// Follows `byte`; returns whether it is outside any string (and not the closing quote).
    fn outside(&mut self, byte: u8) -> bool {
        if self.inside {
            if self.escaped {
                self.escaped = false;
            } else if byte == b'\\' {
                self.escaped = true;
            } else if byte == b'"' {
                self.inside = false;
            }
            false
        } else if byte == b'"' {
            self.inside = true;
            false
        } else {
            true
        }
    }
}

#[derive(Debug, Default, PartialEq, Eq)]
enum State {
    /// Between texts.
    #[default]
    Between,
    /// Inside a text; `discarding` once it was reported too large or too deep.
    Text {
        depth: usize,
        strings: Strings,
        discarding: bool,
    },
    /// Inside a stray token (a string one when `strings.inside` was set by its first quote).
    Stray { strings: Strings },
}

/// The framer of one connection.
#[derive(Debug, Default)]
pub struct Framer {
    state: State,
    buf: Vec<u8>,
}

/// A byte that resets the parser (QMP's spec: `0xFF`, or a control character but tab, CR, LF).
fn resets(byte: u8) -> bool {
    byte == 0xff || (byte < 0x20 && !matches!(byte, b'\t' | b'\r' | b'\n'))
}

impl Framer {
    /// Feeds `input`, returning the frames it completed.
    pub fn feed(&mut self, input: &[u8]) -> Vec<Frame> {
        let mut frames = Vec::new();
        for &byte in input {
            if resets(byte) {
                frames.extend(self.reset(byte));
                continue;
            }
            if let Some(frame) = self.push(byte) {
                frames.push(frame);
            }
            // A stray token ended by an opening bracket: that bracket starts a text.
            if self.state == State::Between && matches!(byte, b'{' | b'[') && self.buf.is_empty() {
                self.buf.push(byte);
                self.state = State::Text {
                    depth: 1,
                    strings: Strings::default(),
                    discarding: false,
                };
            }
        }
        frames
    }

    /// A reset byte: what was pending is reported, and parsing starts afresh.
    fn reset(&mut self, byte: u8) -> Option<Frame> {
        let pending = !matches!(
            self.state,
            State::Between
                | State::Text {
                    discarding: true,
                    ..
                }
        );
        self.state = State::Between;
        self.buf.clear();
        pending.then(|| {
            Frame::Invalid(format!(
                "JSON parse error, byte {byte:#04x}: the input so far was dropped"
            ))
        })
    }

    fn stray(&mut self) -> Frame {
        let token =
            String::from_utf8_lossy(&self.buf[..self.buf.len().min(MAX_QUOTED)]).into_owned();
        self.buf.clear();
        self.state = State::Between;
        Frame::Invalid(format!(
            "JSON parse error, stray `{token}`: QMP input must be a JSON object"
        ))
    }

    fn push(&mut self, byte: u8) -> Option<Frame> {
        match &mut self.state {
            State::Between => {
                if !byte.is_ascii_whitespace() && !matches!(byte, b'{' | b'[') {
                    self.buf.push(byte);
                    let mut strings = Strings::default();
                    strings.outside(byte);
                    self.state = State::Stray { strings };
                }
                None
            }
            // A stray string ends at its closing quote, brackets and spaces in it included.
            State::Stray { strings } if self.buf.first() == Some(&b'"') => {
                strings.outside(byte);
                let closed = !strings.inside;
                if self.buf.len() < MAX_QUOTED {
                    self.buf.push(byte);
                }
                closed.then(|| self.stray())
            }
            // Any other stray token ends at whitespace or an opening bracket.
            State::Stray { .. } => {
                if byte.is_ascii_whitespace() || matches!(byte, b'{' | b'[') {
                    return Some(self.stray());
                }
                if self.buf.len() < MAX_QUOTED {
                    self.buf.push(byte);
                }
                None
            }
            State::Text {
                depth,
                strings,
                discarding,
            } => {
                if !*discarding {
                    self.buf.push(byte);
                }
                if strings.outside(byte) {
                    match byte {
                        b'{' | b'[' => *depth += 1,
                        b'}' | b']' => *depth -= 1,
                        _ => {}
                    }
                }
                if *depth == 0 {
                    let done = std::mem::take(&mut self.buf);
                    let discarded = *discarding;
                    self.state = State::Between;
                    return (!discarded).then_some(Frame::Text(done));
                }
                if *discarding {
                    return None;
                }
                let too_deep = *depth > MAX_DEPTH;
                if too_deep || self.buf.len() > MAX_MESSAGE {
                    *discarding = true;
                    self.buf = Vec::new();
                    return Some(Frame::Invalid(if too_deep {
                        format!("JSON parse error, nested deeper than {MAX_DEPTH} levels")
                    } else {
                        format!("JSON parse error, a message longer than {MAX_MESSAGE} bytes")
                    }));
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(frames: &[Frame]) -> Vec<String> {
        frames
            .iter()
            .map(|f| match f {
                Frame::Text(t) => String::from_utf8_lossy(t).into_owned(),
                Frame::Invalid(why) => format!("INVALID {why}"),
            })
            .collect()
    }

    #[test]
    fn texts_need_no_separator_and_may_span_lines_and_reads() {
        let mut framer = Framer::default();
        let mut frames = framer.feed(br#"{"execute":"a"}{"execute":"b","arguments":{"x":"}{"}}"#);
        frames.extend(framer.feed(b"\n  {\"execute\":\n"));
        assert_eq!(frames.len(), 2);
        frames.extend(framer.feed(br#""c\"}"}"#));
        assert_eq!(
            texts(&frames),
            [
                r#"{"execute":"a"}"#,
                r#"{"execute":"b","arguments":{"x":"}{"}}"#,
                "{\"execute\":\n\"c\\\"}\"}"
            ]
        );
    }

    #[test]
    fn stray_tokens_are_reported_once_and_a_bracket_after_them_starts_a_text() {
        let mut framer = Framer::default();
        let frames = framer.feed(b"42 nonsense{\"execute\":\"a\"} ] ");
        assert_eq!(
            texts(&frames),
            [
                "INVALID JSON parse error, stray `42`: QMP input must be a JSON object",
                "INVALID JSON parse error, stray `nonsense`: QMP input must be a JSON object",
                r#"{"execute":"a"}"#,
                "INVALID JSON parse error, stray `]`: QMP input must be a JSON object",
            ]
        );
    }

    #[test]
    fn a_text_too_large_or_too_deep_is_reported_and_the_rest_of_it_skipped() {
        let mut framer = Framer::default();
        let mut huge = b"{\"execute\":\"".to_vec();
        huge.resize(MAX_MESSAGE + 10, b'x');
        // The rest of the text, braces in a string included, is followed and dropped.
        huge.extend(b"\", \"y\": {\"z\": \"}\"}}{\"execute\":\"after\"}");
        let frames = framer.feed(&huge);
        assert_eq!(
            texts(&frames),
            [
                format!("INVALID JSON parse error, a message longer than {MAX_MESSAGE} bytes"),
                r#"{"execute":"after"}"#.to_string(),
            ]
        );
        let mut deep = vec![b'['; MAX_DEPTH + 1];
        deep.extend(vec![b']'; MAX_DEPTH + 1]);
        deep.extend(b"{}");
        assert_eq!(
            texts(&Framer::default().feed(&deep)),
            [
                format!("INVALID JSON parse error, nested deeper than {MAX_DEPTH} levels"),
                "{}".to_string()
            ]
        );
    }

    #[test]
    fn a_reset_byte_drops_what_was_pending_and_parsing_starts_afresh() {
        let mut framer = Framer::default();
        let frames = framer.feed(b"{\"execute\": \"unterminated \xff{\"execute\":\"a\"}\x04\xff");
        assert_eq!(
            texts(&frames),
            [
                "INVALID JSON parse error, byte 0xff: the input so far was dropped",
                r#"{"execute":"a"}"#,
            ]
        );
    }

    #[test]
    fn a_stray_string_is_one_token_whatever_it_holds() {
        let frames = Framer::default().feed(b"\"a{b \\\" c\" {\"execute\":\"a\"}");
        assert_eq!(
            texts(&frames),
            [
                "INVALID JSON parse error, stray `\"a{b \\\" c\"`: QMP input must be a JSON object",
                r#"{"execute":"a"}"#,
            ]
        );
    }
}
