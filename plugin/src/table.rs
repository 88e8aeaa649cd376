//! Plain aligned columns, the way `kubectl get` prints them.

/// `header` and `rows` with each column as wide as its widest cell, three spaces apart; the
/// last column is not padded.
pub fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let last = row.len().saturating_sub(1);
        for (i, cell) in row.iter().enumerate() {
            out.push_str(cell);
            if i < last {
                let pad = widths[i] - cell.chars().count() + 3;
                out.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push('\n');
    }
    out
}

/// A duration the way `kubectl get` shows ages: `45s`, `12m`, `3h`, `2d`.
pub fn age(seconds: i64) -> String {
    match seconds.max(0) {
        s if s < 120 => format!("{s}s"),
        s if s < 2 * 3600 => format!("{}m", s / 60),
        s if s < 2 * 86_400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// Seconds from `time` to now.
pub fn since(time: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>) -> String {
    time.map_or_else(
        || "-".to_owned(),
        |t| age(k8s_openapi::jiff::Timestamp::now().as_second() - t.0.as_second()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_as_wide_as_their_widest_cell() {
        let text = render(
            &["NAME", "PHASE"],
            &[
                vec!["a".to_owned(), "Running".to_owned()],
                vec!["longer-name".to_owned(), "Ready".to_owned()],
            ],
        );
        assert_eq!(
            text,
            "NAME          PHASE\na             Running\nlonger-name   Ready\n"
        );
    }

    #[test]
    fn ages_read_like_kubectls() {
        assert_eq!(age(45), "45s");
        assert_eq!(age(12 * 60), "12m");
        assert_eq!(age(3 * 3600), "3h");
        assert_eq!(age(3 * 86_400), "3d");
    }
}
