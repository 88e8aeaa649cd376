//! A sequence's completion as text while it grows: decoded a few tokens at a time (never the
//! whole completion again per token), with stop strings found across token boundaries and what
//! might still change held back.

use graft_engine::text::tokenizer::Tokenizer;

/// How many prompt tokens the completion is first decoded after: enough context for what a
/// tokenizer drops at the start of a text (SentencePiece's leading space).
const CONTEXT: usize = 4;

/// The decoding state of one sequence, as vLLM and TGI keep it: the tokens decoded so far are
/// split at `read` into settled ones, whose text is in `text`, and new ones not yet forming
/// whole characters; `prefix..read` is the short run of settled tokens decoded again with the
/// new ones, so each step's decode is a few tokens long whatever the completion's length.
#[derive(Clone, Debug)]
pub struct Detokenizer {
    /// The prompt's last tokens, then the completion's.
    tokens: Vec<u32>,
    prefix: usize,
    read: usize,
    skip_special_tokens: bool,
    /// The completion's settled text.
    text: String,
    /// Bytes of `text` already sent.
    pub sent: usize,
}

impl Detokenizer {
    pub fn new(prompt: &[u32], skip_special_tokens: bool) -> Self {
        let tokens = prompt[prompt.len().saturating_sub(CONTEXT)..].to_vec();
        Self {
            prefix: 0,
            read: tokens.len(),
            tokens,
            skip_special_tokens,
            text: String::new(),
            sent: 0,
        }
    }

    /// The completion's settled text: every token pushed, but those that do not yet decode
    /// to whole characters.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Adds the next completion token; the text grows once the tokens since the last growth
    /// decode to whole characters.
    pub fn push(&mut self, tokenizer: &Tokenizer, token: u32) {
        self.tokens.push(token);
        self.settle(tokenizer, false);
    }

    /// The sequence ended: the unsettled tokens' text joins, an incomplete character as
    /// U+FFFD, as a whole decode would show it.
    pub fn finish(&mut self, tokenizer: &Tokenizer) {
        self.settle(tokenizer, true);
    }

    fn settle(&mut self, tokenizer: &Tokenizer, last: bool) {
        if self.read == self.tokens.len() {
            return;
        }
        let decode = |ids: &[u32]| {
            tokenizer
                .decode(ids, self.skip_special_tokens)
                .unwrap_or_default()
        };
        let before = decode(&self.tokens[self.prefix..self.read]);
        let after = decode(&self.tokens[self.prefix..]);
        if !last && after.ends_with('\u{FFFD}') {
            return;
        }
        // The settled tokens may decode differently next to the new ones (a character split
        // across them): then what follows the characters both share is new.
        let new = after
            .strip_prefix(before.as_str())
            .unwrap_or_else(|| past_common(&before, &after));
        self.text.push_str(new);
        self.prefix = self.read;
        self.read = self.tokens.len();
    }
}

/// The earliest stop string in `text` that ends after byte `from` (earlier text was already
/// checked), as a byte offset.
pub fn first_stop(text: &str, stops: &[String], from: usize) -> Option<usize> {
    stops
        .iter()
        .filter_map(|stop| {
            let start = floor_char_boundary(text, from.saturating_sub(stop.len()));
            text[start..].find(stop.as_str()).map(|i| start + i)
        })
        .min()
}

/// How much of `text` can be sent: not a trailing U+FFFD, nor a tail that could begin a stop
/// string.
pub fn held_back(text: &str, stops: &[String]) -> usize {
    let mut end = text.trim_end_matches('\u{FFFD}').len();
    for stop in stops {
        for (i, _) in stop.char_indices().skip(1) {
            if text[..end].ends_with(&stop[..i]) {
                end = end.min(text[..end].len() - i);
            }
        }
    }
    end
}

/// What `after` has past the characters it shares with `before`.
fn past_common<'a>(before: &str, after: &'a str) -> &'a str {
    let common = before
        .char_indices()
        .zip(after.chars())
        .find(|((_, a), b)| a != b)
        .map_or(before.len().min(after.len()), |((i, _), _)| i);
    &after[floor_char_boundary(after, common)..]
}

fn floor_char_boundary(text: &str, mut at: usize) -> usize {
    while at > 0 && !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_tokenizer() -> Tokenizer {
        Tokenizer::from_dir(&graft_testenv::repo_root().join("engine/tests/data/tiny/made"))
            .expect("the tiny tokenizer")
    }

    /// Token by token, the settled text is always a prefix of the whole completion decoded at
    /// once, and after `finish` equal to it — on random ids of a byte-level vocabulary, where
    /// characters split across tokens.
    #[test]
    fn incremental_text_equals_the_whole_decode() {
        let tokenizer = tiny_tokenizer();
        let mut rng = graft_engine::rng::Rng::seed(11);
        let mut split = 0;
        for _ in 0..200 {
            let mut ids = |n| -> Vec<u32> {
                (0..n)
                    .map(|_| u32::try_from(rng.next_u64() % 384).expect("small"))
                    .collect()
            };
            // A prompt that ends in whole characters, as chat templates do.
            let prompt = loop {
                let prompt = ids(6);
                let context = tokenizer.decode(&prompt[2..], true).expect("decodes");
                if !context.contains('\u{FFFD}') {
                    break prompt;
                }
            };
            let completion = ids(24);
            let whole = |ids: &[u32]| {
                let context = &prompt[prompt.len() - CONTEXT..];
                let with = tokenizer
                    .decode(&[context, ids].concat(), true)
                    .expect("decodes");
                let context = tokenizer.decode(context, true).expect("decodes");
                with.strip_prefix(context.as_str()).map_or_else(
                    || tokenizer.decode(ids, true).expect("decodes"),
                    str::to_owned,
                )
            };
            let mut text = Detokenizer::new(&prompt, true);
            for (i, &token) in completion.iter().enumerate() {
                text.push(&tokenizer, token);
                let full = whole(&completion[..=i]);
                assert!(
                    full.starts_with(text.text()),
                    "{:?} is not a prefix of {full:?}",
                    text.text()
                );
                split += usize::from(full.len() > text.text().len());
            }
            text.finish(&tokenizer);
            assert_eq!(text.text(), whole(&completion));
        }
        assert!(split > 0, "some characters were split across tokens");
    }

    /// A character split between the prompt's last token and the completion's first: the
    /// completion is what follows the shared characters.
    #[test]
    fn a_completed_character_is_new_text() {
        assert_eq!(past_common("ab\u{FFFD}", "ab\u{E9}c"), "\u{E9}c");
        assert_eq!(past_common("ab", "ab"), "");
    }

    #[test]
    fn stop_strings_are_found_across_token_boundaries() {
        let stops = vec!["END".to_owned()];
        assert_eq!(first_stop("abc EN", &stops, 4), None);
        assert_eq!(first_stop("abc END more", &stops, 6), Some(4));
    }

    #[test]
    fn a_possible_stop_prefix_and_a_broken_character_are_held_back() {
        let stops = vec!["END".to_owned()];
        assert_eq!(held_back("hello EN", &stops), 6);
        assert_eq!(held_back("hello E", &stops), 6);
        assert_eq!(held_back("hello", &stops), 5);
        assert_eq!(held_back("h\u{FFFD}", &[]), 1);
    }
}
