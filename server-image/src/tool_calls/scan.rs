//! An incremental scan of one JSON object in a model's text, as it grows: where its `name`
//! and its arguments are, and where it ends, without waiting for the whole object.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Key,
    Colon,
    Value,
    /// Inside a value at depth 1 (a string, a nested object or array, or a scalar).
    InValue,
    CommaOrEnd,
}

/// An incremental scan of one JSON object: its `name`, where its arguments lie, its end.
#[derive(Debug)]
pub(super) struct ObjectScan {
    pub(super) start: usize,
    /// The next byte to look at.
    pub(super) at: usize,
    depth: usize,
    in_string: bool,
    escaped: bool,
    expect: Expect,
    token_start: usize,
    key: String,
    pub(super) name: Option<String>,
    pub(super) arguments: Option<(usize, Option<usize>)>,
    pub(super) arguments_is_string: bool,
    pub(super) arguments_sent: usize,
    pub(super) header_sent: Option<usize>,
    pub(super) end: Option<usize>,
}

impl ObjectScan {
    pub(super) fn new(start: usize) -> Self {
        Self {
            start,
            at: start,
            depth: 0,
            in_string: false,
            escaped: false,
            expect: Expect::Key,
            token_start: start,
            key: String::new(),
            name: None,
            arguments: None,
            arguments_is_string: false,
            arguments_sent: 0,
            header_sent: None,
            end: None,
        }
    }

    // JSON's structure is ASCII, so bytes can be scanned in UTF-8 text.
    pub(super) fn scan(&mut self, text: &str) {
        let bytes = text.as_bytes();
        while self.at < bytes.len() && self.end.is_none() {
            let (i, b) = (self.at, bytes[self.at]);
            self.at += 1;
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if b == b'\\' {
                    self.escaped = true;
                } else if b == b'"' {
                    self.in_string = false;
                    if self.depth == 1 {
                        match self.expect {
                            Expect::Key => {
                                self.key = serde_json::from_str(&text[self.token_start..=i])
                                    .unwrap_or_default();
                                self.expect = Expect::Colon;
                            }
                            Expect::InValue => self.value_end(text, i + 1),
                            _ => {}
                        }
                    }
                }
                continue;
            }
            match b {
                b'"' => {
                    self.in_string = true;
                    if self.depth == 1 {
                        if self.expect == Expect::Value {
                            self.value_start(i, true);
                        } else {
                            self.token_start = i;
                        }
                    }
                }
                b'{' | b'[' => {
                    if self.depth == 1 && self.expect == Expect::Value {
                        self.value_start(i, false);
                    }
                    self.depth += 1;
                }
                b'}' | b']' => {
                    self.depth = self.depth.saturating_sub(1);
                    if self.depth == 1 && self.expect == Expect::InValue {
                        self.value_end(text, i + 1);
                    } else if self.depth == 0 {
                        if self.expect == Expect::InValue {
                            self.value_end(text, i);
                        }
                        self.end = Some(i + 1);
                    }
                }
                b':' if self.depth == 1 && self.expect == Expect::Colon => {
                    self.expect = Expect::Value;
                }
                b',' if self.depth == 1 => {
                    if self.expect == Expect::InValue {
                        self.value_end(text, i);
                    }
                    self.expect = Expect::Key;
                }
                b' ' | b'\n' | b'\r' | b'\t' => {}
                _ if self.depth == 1 && self.expect == Expect::Value => {
                    self.value_start(i, false);
                }
                _ => {}
            }
        }
    }

    fn value_start(&mut self, at: usize, string: bool) {
        self.token_start = at;
        self.expect = Expect::InValue;
        if self.key == "arguments" || self.key == "parameters" {
            self.arguments = Some((at, None));
            self.arguments_is_string = string;
        }
    }

    fn value_end(&mut self, text: &str, end: usize) {
        let value = text[self.token_start..end].trim_end();
        let end = self.token_start + value.len();
        if self.key == "name" {
            self.name = serde_json::from_str::<String>(value).ok();
        } else if let Some((start, None)) = self.arguments
            && start == self.token_start
        {
            self.arguments = Some((start, Some(end)));
        }
        self.expect = Expect::CommaOrEnd;
    }
}
