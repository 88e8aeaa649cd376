//! GBNF (llama.cpp's EBNF, which vLLM's xgrammar backend takes in `guided_grammar`) read into
//! llguidance's Lark: rules `name ::= ...` become `name: ...` with lowercase names (uppercase
//! would make Lark terminals), character classes and `.` become regexes, strings are
//! re-quoted as JSON, and `root` is the entry rule.

use std::{collections::HashMap, fmt::Write};

/// Whether `source` is GBNF rather than Lark.
pub fn is_gbnf(source: &str) -> bool {
    source.contains("::=")
}

#[derive(Debug, PartialEq)]
enum Piece {
    Name(String),
    Define,
    /// Already in Lark syntax.
    Lark(String),
}

/// The Lark grammar for a GBNF `source`, or what is wrong with it.
pub fn to_lark(source: &str) -> Result<String, String> {
    let pieces = lex(source)?;
    let mut rules: Vec<(String, Vec<&Piece>)> = Vec::new();
    let mut i = 0;
    while i < pieces.len() {
        match (&pieces[i], pieces.get(i + 1)) {
            (Piece::Name(name), Some(Piece::Define)) => {
                rules.push((name.clone(), Vec::new()));
                i += 2;
            }
            (piece, _) => {
                let (_, body) = rules
                    .last_mut()
                    .ok_or("a GBNF grammar starts with a rule, `name ::= ...`")?;
                if *piece == Piece::Define {
                    return Err("`::=` without a rule name before it".to_owned());
                }
                body.push(piece);
                i += 1;
            }
        }
    }
    let mut names: HashMap<&str, String> = HashMap::new();
    for (n, (name, _)) in rules.iter().enumerate() {
        let mut lark: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .collect();
        lark.insert_str(0, "g-");
        if names.values().any(|v| *v == lark) {
            let _ = write!(lark, "-{n}");
        }
        names.entry(name.as_str()).or_insert(lark);
    }
    let root = names
        .get("root")
        .ok_or("a GBNF grammar needs a `root` rule")?;
    let mut out = format!("start: {root}\n");
    for (name, body) in &rules {
        if body.is_empty() {
            return Err(format!("the rule {name} is empty"));
        }
        let text: Vec<String> = body
            .iter()
            .map(|piece| match piece {
                Piece::Name(n) => names
                    .get(n.as_str())
                    .cloned()
                    .ok_or_else(|| format!("the rule {n} is not defined")),
                Piece::Lark(text) => Ok(text.clone()),
                Piece::Define => unreachable!("split off above"),
            })
            .collect::<Result<_, _>>()?;
        let mut line = format!("{}:", names[name.as_str()]);
        for piece in text {
            // Postfix operators stay on their atom.
            if !(["*", "+", "?"].contains(&piece.as_str()) || piece.starts_with('{')) {
                line.push(' ');
            }
            line.push_str(&piece);
        }
        out.push_str(&line);
        out.push('\n');
    }
    Ok(out)
}

fn lex(source: &str) -> Result<Vec<Piece>, String> {
    let chars: Vec<char> = source.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            _ if c.is_whitespace() => i += 1,
            '#' => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            ':' if chars[i..].starts_with(&[':', ':', '=']) => {
                out.push(Piece::Define);
                i += 3;
            }
            '"' => {
                let (text, next) = string(&chars, i + 1)?;
                out.push(Piece::Lark(
                    serde_json::to_string(&text).unwrap_or_default(),
                ));
                i = next;
            }
            '[' => {
                let start = i;
                i += 1;
                while i < chars.len() && chars[i] != ']' {
                    i += if chars[i] == '\\' { 2 } else { 1 };
                }
                if i >= chars.len() {
                    return Err("a character class without its `]`".to_owned());
                }
                i += 1;
                let class: String = chars[start..i].iter().collect();
                out.push(Piece::Lark(format!("/{}/", class.replace('/', "\\x2F"))));
            }
            '.' => {
                out.push(Piece::Lark("/(?s:.)/".to_owned()));
                i += 1;
            }
            '|' | '(' | ')' | '*' | '+' | '?' => {
                out.push(Piece::Lark(c.to_string()));
                i += 1;
            }
            '{' => {
                let start = i;
                while i < chars.len() && chars[i] != '}' {
                    i += 1;
                }
                let repeat: String = chars[start..(i + 1).min(chars.len())].iter().collect();
                if !repeat
                    .trim_matches(['{', '}'])
                    .chars()
                    .all(|c| c.is_ascii_digit() || c == ',' || c == ' ')
                {
                    return Err(format!("a repetition {repeat} is not {{m,n}}"));
                }
                out.push(Piece::Lark(repeat.replace(' ', "")));
                i += 1;
            }
            _ if c.is_ascii_alphanumeric() || c == '_' || c == '-' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == '-')
                {
                    i += 1;
                }
                out.push(Piece::Name(chars[start..i].iter().collect()));
            }
            _ => return Err(format!("unexpected {c:?} in the GBNF grammar")),
        }
    }
    Ok(out)
}

/// A GBNF string's text from just after its opening quote, and where it ends.
fn string(chars: &[char], mut i: usize) -> Result<(String, usize), String> {
    let mut text = String::new();
    loop {
        let c = *chars.get(i).ok_or("a string without its closing quote")?;
        i += 1;
        match c {
            '"' => return Ok((text, i)),
            '\\' => {
                let e = *chars.get(i).ok_or("a string ends in a backslash")?;
                i += 1;
                let hex = |len: usize, i: &mut usize| -> Result<char, String> {
                    let digits: String =
                        chars.get(*i..*i + len).unwrap_or_default().iter().collect();
                    *i += len;
                    u32::from_str_radix(&digits, 16)
                        .ok()
                        .and_then(char::from_u32)
                        .ok_or_else(|| format!("a bad escape \\{e}{digits}"))
                };
                text.push(match e {
                    'n' => '\n',
                    'r' => '\r',
                    't' => '\t',
                    'x' => hex(2, &mut i)?,
                    'u' => hex(4, &mut i)?,
                    'U' => hex(8, &mut i)?,
                    other => other,
                });
            }
            other => text.push(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gbnf_reads_as_lark() {
        let gbnf = "# answers\nroot ::= Answer (\", \" Answer)*\nAnswer ::= \"yes\\x21\" | [0-9/]{1,2}\n  | \"é\" .\n";
        let lark = to_lark(gbnf).expect("converts");
        assert_eq!(
            lark,
            "start: g-root\ng-root: g-answer ( \", \" g-answer )*\ng-answer: \"yes!\" | /[0-9\\x2F]/{1,2} | \"é\" /(?s:.)/\n"
        );
        assert!(to_lark("root ::= missing").is_err());
        assert!(to_lark("start ::= \"x\"").is_err(), "no root");
    }
}
