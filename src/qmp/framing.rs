//! Splits a QMP byte stream into JSON texts the way QEMU's JSON streamer does: a text ends where
//! its outermost `{...}` (or `[...]`) closes, brackets inside strings not counting, so texts need
//! no separator and may span lines. Whitespace between texts is skipped. Anything else between
//! texts is a stray token, reported once and skipped. A text over [`MAX_MESSAGE`] bytes or
//! nested deeper than [`MAX_DEPTH`] is reported and skipped to the end of its line, so the
//! connection stays usable.

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

#[derive(Debug, Default, PartialEq, Eq)]
enum State {
    /// Between texts.
    #[default]
    Between,
    /// Inside a text.
    Text {
        depth: usize,
        in_string: bool,
        escaped: bool,
    },
    /// Inside a stray token.
    Stray,
    /// Dropping input to the next newline after a text too large or too deep.
    SkipLine,
}

/// The framer of one connection.
#[derive(Debug, Default)]
pub struct Framer {
    state: State,
    buf: Vec<u8>,
}

impl Framer {
    /// Feeds `input`, returning the frames it completed.
    pub fn feed(&mut self, input: &[u8]) -> Vec<Frame> {
        let mut frames = Vec::new();
        for &byte in input {
            if let Some(frame) = self.push(byte) {
                frames.push(frame);
            }
            // A stray token ended by an opening bracket: that bracket starts a text.
            if self.state == State::Between && matches!(byte, b'{' | b'[') && self.buf.is_empty() {
                self.start_text(byte);
            }
        }
        frames
    }

    fn start_text(&mut self, byte: u8) {
        self.buf.push(byte);
        self.state = State::Text {
            depth: 1,
            in_string: false,
            escaped: false,
        };
    }

    fn push(&mut self, byte: u8) -> Option<Frame> {
        match &mut self.state {
            State::Between => {
                if !byte.is_ascii_whitespace() && !matches!(byte, b'{' | b'[') {
                    self.buf.push(byte);
                    self.state = State::Stray;
                }
                None
            }
            State::Stray => {
                if byte.is_ascii_whitespace() || matches!(byte, b'{' | b'[') {
                    let token =
                        String::from_utf8_lossy(&self.buf[..self.buf.len().min(MAX_QUOTED)])
                            .into_owned();
                    self.buf.clear();
                    self.state = State::Between;
                    return Some(Frame::Invalid(format!(
                        "JSON parse error, stray `{token}`: QMP input must be a JSON object"
                    )));
                }
                if self.buf.len() < MAX_QUOTED {
                    self.buf.push(byte);
                }
                None
            }
            State::SkipLine => {
                if byte == b'\n' {
                    self.state = State::Between;
                }
                None
            }
            State::Text {
                depth,
                in_string,
                escaped,
            } => {
                self.buf.push(byte);
                if *in_string {
                    if *escaped {
                        *escaped = false;
                    } else if byte == b'\\' {
                        *escaped = true;
                    } else if byte == b'"' {
                        *in_string = false;
                    }
                } else {
                    match byte {
                        b'"' => *in_string = true,
                        b'{' | b'[' => *depth += 1,
                        b'}' | b']' => *depth -= 1,
                        _ => {}
                    }
                }
                let (depth, too_deep) = (*depth, *depth > MAX_DEPTH);
                if depth == 0 {
                    self.state = State::Between;
                    return Some(Frame::Text(std::mem::take(&mut self.buf)));
                }
                if too_deep || self.buf.len() > MAX_MESSAGE {
                    self.buf.clear();
                    self.state = if byte == b'\n' {
                        State::Between
                    } else {
                        State::SkipLine
                    };
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
    fn a_text_too_large_or_too_deep_is_reported_and_its_line_skipped() {
        let mut framer = Framer::default();
        let mut huge = b"{\"execute\":\"".to_vec();
        huge.resize(MAX_MESSAGE + 10, b'x');
        huge.extend(b"\"}\n{\"execute\":\"after\"}");
        let frames = framer.feed(&huge);
        assert_eq!(
            texts(&frames),
            [
                format!("INVALID JSON parse error, a message longer than {MAX_MESSAGE} bytes"),
                r#"{"execute":"after"}"#.to_string(),
            ]
        );
        let mut deep = vec![b'['; MAX_DEPTH + 1];
        deep.extend(b"\n{}");
        assert_eq!(
            texts(&Framer::default().feed(&deep)),
            [
                format!("INVALID JSON parse error, nested deeper than {MAX_DEPTH} levels"),
                "{}".to_string()
            ]
        );
    }
}
