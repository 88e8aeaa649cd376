//! `kubectl graft loss JOB`: the loss curve in the terminal, from the short history the
//! trainer keeps in `status.progress.history` (and the latest step beside it).

use std::fmt::Write as _;

use anyhow::Context as _;
use graft_api::{FineTuneJob, Progress};
use kube::{Api, Client};

const TRAIN: char = '•';
const EVAL: char = 'o';

pub async fn render(
    client: &Client,
    namespace: &str,
    job: &str,
    width: usize,
    height: usize,
) -> anyhow::Result<String> {
    let api: Api<FineTuneJob> = Api::namespaced(client.clone(), namespace);
    let ftj = api
        .get_opt(job)
        .await
        .with_context(|| format!("reading FineTuneJob {job}"))?
        .with_context(|| format!("no FineTuneJob {job} in namespace {namespace}"))?;
    let status = ftj.status.unwrap_or_default();
    let Some(progress) = status.progress else {
        let phase = status
            .phase
            .map_or_else(|| "not started".to_owned(), |p| format!("{p:?}"));
        return Ok(format!(
            "{job}: no loss reported yet (phase {phase}); the trainer reports from its first step.\n"
        ));
    };
    Ok(format!(
        "{}\n{}",
        title(job, &progress),
        chart(&series(&progress), width, height)
    ))
}

fn title(job: &str, progress: &Progress) -> String {
    let mut title = format!(
        "{job}: step {} of {}, epoch {}",
        progress.step,
        progress.total_steps,
        progress.epoch + 1
    );
    if let Some(loss) = progress.loss {
        let _ = write!(title, ", loss {loss:.4}");
    }
    if let Some(eval) = progress.eval_loss {
        let _ = write!(title, ", validation loss {eval:.4}");
    }
    title
}

/// The curve to draw: training loss by step and validation loss where it was measured.
#[derive(Debug, Default, PartialEq)]
pub struct Series {
    pub train: Vec<(f64, f64)>,
    pub eval: Vec<(f64, f64)>,
}

#[allow(clippy::cast_precision_loss)]
fn series(progress: &Progress) -> Series {
    let mut series = Series::default();
    for point in &progress.history {
        series.train.push((point.step as f64, point.loss));
        if let Some(eval) = point.eval_loss {
            series.eval.push((point.step as f64, eval));
        }
    }
    // The status may be newer than the history's last point (an older trainer keeps none).
    if let Some(loss) = progress.loss
        && progress
            .history
            .last()
            .is_none_or(|p| p.step < progress.step)
    {
        series.train.push((progress.step as f64, loss));
    }
    series
}

/// A scatter plot of `series` in `width` × `height` characters, with the loss on the left
/// axis and steps below.
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_precision_loss
)]
pub fn chart(series: &Series, width: usize, height: usize) -> String {
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    let all = series.train.iter().chain(&series.eval);
    for &(x, y) in all.filter(|(_, y)| y.is_finite()) {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x0 > x1 {
        return "no finite loss values to draw\n".to_owned();
    }
    if (y1 - y0).abs() < f64::EPSILON {
        (y0, y1) = (y0 - 0.5, y1 + 0.5);
    }
    let mut grid = vec![vec![' '; width]; height];
    let mut plot = |points: &[(f64, f64)], mark: char| {
        for &(x, y) in points.iter().filter(|(_, y)| y.is_finite()) {
            let col = if x1 > x0 {
                ((x - x0) / (x1 - x0) * (width - 1) as f64).round() as usize
            } else {
                0
            };
            let row = ((y1 - y) / (y1 - y0) * (height - 1) as f64).round() as usize;
            grid[row.min(height - 1)][col.min(width - 1)] = mark;
        }
    };
    plot(&series.train, TRAIN);
    plot(&series.eval, EVAL);

    let label = |row: usize| y1 - (y1 - y0) * row as f64 / (height - 1) as f64;
    let labelled = [0, height / 2, height - 1];
    let margin = labelled
        .iter()
        .map(|&r| format!("{:.4}", label(r)).len())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for (r, line) in grid.iter().enumerate() {
        let (text, tick) = if labelled.contains(&r) {
            (format!("{:.4}", label(r)), '┤')
        } else {
            (String::new(), '│')
        };
        let line: String = line.iter().collect();
        let _ = writeln!(out, "{text:>margin$} {tick}{}", line.trim_end());
    }
    let _ = writeln!(out, "{:margin$} └{}", "", "─".repeat(width));
    let (first, last) = (format!("{x0:.0}"), format!("{x1:.0}"));
    let gap = width.saturating_sub(first.len() + last.len() + 4) / 2;
    let _ = writeln!(
        out,
        "{:margin$}  {first}{}step{}{last}",
        "",
        " ".repeat(gap),
        " ".repeat(width.saturating_sub(first.len() + last.len() + 4 + gap))
    );
    let _ = write!(out, "{:margin$}  {TRAIN} training loss", "");
    if !series.eval.is_empty() {
        let _ = write!(out, "   {EVAL} validation loss");
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use graft_api::LossPoint;

    use super::*;

    fn rows(chart: &str) -> Vec<String> {
        // The plot's rows, without the axis labels: what follows the tick.
        chart
            .lines()
            .take_while(|l| !l.contains('└'))
            .map(|l| l.split_once(['┤', '│']).map_or("", |(_, r)| r).to_owned())
            .collect()
    }

    #[test]
    fn a_falling_loss_runs_from_the_top_left_to_the_bottom_right() {
        let train: Vec<(f64, f64)> = (1..=40_u32)
            .map(|s| (f64::from(s), 4.0 / f64::from(s)))
            .collect();
        let text = chart(
            &Series {
                train,
                eval: vec![(20.0, 0.5)],
            },
            40,
            10,
        );
        let rows = rows(&text);
        assert_eq!(rows.len(), 10);
        assert!(rows[0].starts_with(TRAIN), "{text}");
        assert_eq!(rows[9].chars().nth(39), Some(TRAIN), "{text}");
        assert!(rows.iter().any(|r| r.contains(EVAL)), "{text}");
        assert!(text.starts_with("4.0000 ┤"), "{text}");
        assert!(text.contains("0.1000 ┤"), "{text}");
        let axis = text
            .lines()
            .find(|l| l.contains("step"))
            .expect("the x axis");
        assert_eq!(
            axis.split_whitespace().collect::<Vec<_>>(),
            ["1", "step", "40"]
        );
        assert!(text.contains("o validation loss"));
    }

    #[test]
    fn the_latest_step_extends_an_older_history() {
        let progress = Progress {
            step: 30,
            total_steps: 100,
            loss: Some(0.7),
            history: vec![LossPoint {
                step: 10,
                loss: 2.0,
                eval_loss: Some(2.1),
            }],
            ..Progress::default()
        };
        let series = series(&progress);
        assert_eq!(series.train, [(10.0, 2.0), (30.0, 0.7)]);
        assert_eq!(series.eval, [(10.0, 2.1)]);
    }

    #[test]
    fn a_flat_curve_still_draws() {
        let text = chart(
            &Series {
                train: vec![(1.0, 1.0), (2.0, 1.0)],
                eval: Vec::new(),
            },
            20,
            5,
        );
        assert_eq!(rows(&text).iter().filter(|r| r.contains(TRAIN)).count(), 1);
    }
}
