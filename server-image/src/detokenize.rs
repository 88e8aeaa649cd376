//! A sequence's completion as text while it grows: decoded after the prompt's last tokens,
//! with stop strings found across token boundaries and what might still change held back.

use graft_engine::text::tokenizer::Tokenizer;

/// The decoding state of one sequence.
#[derive(Clone, Debug)]
pub struct Detokenizer {
    /// The last prompt tokens and their text: decoding the completion after them keeps what
    /// a tokenizer drops at the start of a text (SentencePiece's leading space).
    prefix: Vec<u32>,
    prefix_text: String,
    skip_special_tokens: bool,
    /// Bytes of the decoded completion already sent.
    pub sent: usize,
}

impl Detokenizer {
    pub fn new(tokenizer: &Tokenizer, prompt: &[u32], skip_special_tokens: bool) -> Self {
        let prefix = prompt[prompt.len().saturating_sub(4)..].to_vec();
        let prefix_text = tokenizer
            .decode(&prefix, skip_special_tokens)
            .unwrap_or_default();
        Self {
            prefix,
            prefix_text,
            skip_special_tokens,
            sent: 0,
        }
    }

    /// The completion `generated` so far as text.
    pub fn text(&self, tokenizer: &Tokenizer, generated: &[u32]) -> String {
        let decode = |ids: &[u32]| {
            tokenizer
                .decode(ids, self.skip_special_tokens)
                .unwrap_or_default()
        };
        let with_prefix = decode(&[self.prefix.as_slice(), generated].concat());
        match with_prefix.strip_prefix(self.prefix_text.as_str()) {
            Some(text) => text.to_owned(),
            // The prefix decodes differently next to the completion (a character split across
            // them): decode the completion alone.
            None => decode(generated),
        }
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

fn floor_char_boundary(text: &str, mut at: usize) -> usize {
    while at > 0 && !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;

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
