//! Drawing the screens. Pure functions of [`App`]: they read state and never change it.

use super::app::{App, RunState, RunView, Screen};
use super::setup::{Field, FIELDS};
use crate::report;
use ratatui::layout::{Constraint, Direction, Layout, Rect};
use ratatui::style::{Color, Modifier, Style, Stylize};
use ratatui::symbols::Marker;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Axis, Block, Borders, Chart, Clear, Dataset, GraphType, Paragraph, Row, Table, Wrap};
use ratatui::Frame;

/// Smallest terminal the lab draws into.
pub const MIN_SIZE: (u16, u16) = (60, 16);

/// Colours given to runs in order.
const PALETTE: [Color; 8] = [
    Color::Cyan,
    Color::Yellow,
    Color::Green,
    Color::Magenta,
    Color::LightRed,
    Color::LightBlue,
    Color::White,
    Color::LightGreen,
];

/// Draws the whole lab.
pub fn draw(f: &mut Frame, app: &App) {
    let area = f.area();
    if area.width < MIN_SIZE.0 || area.height < MIN_SIZE.1 {
        let msg = format!(
            "Terminal too small: {}x{}.\nqat-lab needs at least {}x{}.\nEnlarge the window (or zoom out); q quits.",
            area.width, area.height, MIN_SIZE.0, MIN_SIZE.1
        );
        f.render_widget(Paragraph::new(msg).wrap(Wrap { trim: true }), area);
        return;
    }
    let [header, body, footer] =
        Layout::vertical([Constraint::Length(1), Constraint::Min(0), Constraint::Length(1)]).areas(area);
    draw_header(f, app, header);
    match app.screen {
        Screen::Setup => draw_setup(f, app, body),
        Screen::Live => draw_live(f, app, body),
        Screen::Compare => draw_compare(f, app, body),
    }
    draw_footer(f, app, footer);
    if app.show_help {
        draw_help(f, area);
    }
    if app.confirm_quit {
        let n = app.running_count();
        let text = format!(
            "{n} run{} still training.\nQuit and stop {}? Finished epochs are kept on disk.\n\n  y = quit    any other key = stay",
            if n == 1 { " is" } else { "s are" },
            if n == 1 { "it" } else { "them" }
        );
        popup(f, area, "Quit?", &text, 56, 7);
    }
    if app.ascii {
        asciify(f.buffer_mut());
    }
}

/// Replaces every non-ASCII symbol (box drawing, arrows, dashes from widgets that have no ASCII option,
/// such as chart axes) with its closest ASCII look-alike, for terminals and fonts without them.
pub fn asciify(buf: &mut ratatui::buffer::Buffer) {
    for cell in buf.content.iter_mut() {
        let sym = cell.symbol();
        if sym.is_ascii() {
            continue;
        }
        let replacement = match sym {
            "─" | "━" | "—" | "–" | "═" => "-",
            "│" | "┃" | "║" => "|",
            "┌" | "┐" | "└" | "┘" | "├" | "┤" | "┬" | "┴" | "┼" | "╭" | "╮" | "╯" | "╰" => {
                "+"
            }
            "◀" | "←" => "<",
            "▶" | "→" => ">",
            "↑" => "^",
            "↓" => "v",
            "•" | "·" => ".",
            "≥" => ">",
            "░" => ":",
            "▒" => "+",
            "▓" => "=",
            "█" | "▄" | "▀" | "▇" | "▆" => "#",
            "▅" | "▃" => "=",
            "▂" | "▁" => "_",
            "−" => "-",
            _ => "?",
        };
        cell.set_symbol(replacement);
    }
}

fn block<'a>(title: impl Into<Line<'a>>) -> Block<'a> {
    Block::default().borders(Borders::ALL).title(title)
}

fn run_color(i: usize) -> Color {
    PALETTE[i % PALETTE.len()]
}

fn draw_header(f: &mut Frame, app: &App, area: Rect) {
    let tab = |key: &str, name: &str, s: Screen| {
        let style = if app.screen == s {
            Style::default().add_modifier(Modifier::REVERSED | Modifier::BOLD)
        } else {
            Style::default()
        };
        Span::styled(format!(" {key} {name} "), style)
    };
    let running = app.running_count();
    let queued = app.runs.iter().filter(|r| r.state == RunState::Queued).count();
    let line = Line::from(vec![
        Span::styled(" qat-lab ", Style::default().add_modifier(Modifier::BOLD)),
        tab("1", "Setup", Screen::Setup),
        tab("2", "Live", Screen::Live),
        tab("3", "Compare", Screen::Compare),
        Span::raw(format!("  {running} running, {queued} queued  ")),
        Span::styled("? help", Style::default().add_modifier(Modifier::DIM)),
    ]);
    f.render_widget(Paragraph::new(line), area);
}

fn draw_footer(f: &mut Frame, app: &App, area: Rect) {
    let line = match &app.status {
        Some(n) if n.error => Line::from(Span::styled(n.text.clone(), Style::default().fg(Color::LightRed))),
        Some(n) => Line::from(n.text.clone()),
        None => Line::from(match app.screen {
            Screen::Setup => "↑↓ choose  ←→ change  Enter start  b baseline vs this  a all methods  q quit",
            Screen::Live => "↑↓ run  space overlay  p pause  x stop  d remove  Tab next screen  q quit",
            Screen::Compare => "↑↓ run  space include  m acc/loss  r load runs/  d remove  q quit",
        })
        .style(Style::default().add_modifier(Modifier::DIM)),
    };
    f.render_widget(Paragraph::new(line), area);
}

fn draw_setup(f: &mut Frame, app: &App, area: Rect) {
    let [form_area, info_area] =
        Layout::horizontal([Constraint::Percentage(55), Constraint::Percentage(45)]).areas(area);
    let form = &app.setup;
    let rows: Vec<Line> = FIELDS
        .iter()
        .enumerate()
        .map(|(i, field)| {
            let (label, value) = form.row(*field);
            let selected = i == form.cursor;
            let value = if selected && *field != Field::Path { format!("◀ {value} ▶") } else { value };
            let style = if selected { Style::default().add_modifier(Modifier::REVERSED) } else { Style::default() };
            Line::from(vec![Span::raw(format!("{label:<18}")), Span::styled(value, style)])
        })
        .collect();
    let inner_h = form_area.height.saturating_sub(2) as usize;
    let skip = (form.cursor + 1).saturating_sub(inner_h);
    let rows: Vec<Line> = rows.into_iter().skip(skip).collect();
    f.render_widget(Paragraph::new(rows).block(block(" Experiment ")), form_area);

    let e = &form.experiment;
    let mut text = vec![
        Line::from(Span::styled(e.name.clone(), Style::default().add_modifier(Modifier::BOLD))),
        Line::from(if e.description.is_empty() { "Custom experiment.".to_string() } else { e.description.clone() }),
        Line::from(""),
    ];
    if matches!(form.field(), Field::NoiseKind | Field::NoiseRate) {
        // On the noise rows the panel shows what the noise does, so that "worst" and "40% uniform"
        // can be told apart.
        text.extend(noise_heatmap(&form.noise_matrix()));
    } else {
        text.extend([Line::from(e.regularizer.help()), Line::from("")]);
        if let Some(help) = e.robust.settings().map(|s| s.help()) {
            text.extend([Line::from(help), Line::from("")]);
        }
    }
    match form.build() {
        Ok(_) => {
            text.push(Line::from(Span::styled("Ready: Enter starts this run.", Style::default().fg(Color::Green))))
        }
        Err(msg) => {
            text.push(Line::from(Span::styled(format!("Cannot start: {msg}"), Style::default().fg(Color::LightRed))))
        }
    }
    text.push(memory_line(e, app.available_memory));
    text.push(Line::from("b: baseline vs this, side by side"));
    text.push(Line::from("a: every method on the same noisy data"));
    f.render_widget(Paragraph::new(text).wrap(Wrap { trim: true }).block(block(" About ")), info_area);
}

/// The noise transition matrix as a grid of shades (row = true class, column = label given), with
/// each row's share kept; more than 12 classes are summarised in words.
fn noise_heatmap(matrix: &crate::ui::setup::NoiseMatrix) -> Vec<Line<'static>> {
    use crate::ui::setup::NoiseMatrix;
    let m = match matrix {
        NoiseMatrix::Known(m) => m,
        NoiseMatrix::Unknown(why) => return vec![Line::from(format!("Noise matrix: {why}")), Line::from("")],
    };
    let n = m.len();
    let diagonal: Vec<f64> = (0..n).map(|i| m[i][i]).collect();
    let (lo, hi) = diagonal.iter().fold((1.0f64, 0.0f64), |(lo, hi), &d| (lo.min(d), hi.max(d)));
    let (worst_i, worst_j, worst) = (0..n)
        .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
        .map(|(i, j)| (i, j, m[i][j]))
        .fold((0, 0, 0.0), |a, b| if b.2 > a.2 { b } else { a });
    let kept =
        if (hi - lo) < 0.005 { format!("{:.0}%", lo * 100.0) } else { format!("{:.0}-{:.0}%", lo * 100.0, hi * 100.0) };
    let summary = format!("kept {kept}; most confused {worst_i}->{worst_j} ({:.0}%)", worst * 100.0);
    if n > 12 {
        return vec![Line::from(format!("Noise over {n} classes: {summary}")), Line::from("")];
    }
    let shade = |v: f64| match v {
        v if v <= 0.0 => ("·", Color::DarkGray),
        v if v < 0.05 => ("░", Color::Blue),
        v if v < 0.2 => ("▒", Color::Cyan),
        v if v < 0.5 => ("▓", Color::Yellow),
        _ => ("█", Color::LightRed),
    };
    let mut lines = vec![Line::from("Noise: true class -> label given")];
    for (i, row) in m.iter().enumerate() {
        let mut spans = vec![Span::raw(format!("{i:>2} "))];
        spans.extend(row.iter().map(|&v| {
            let (glyph, color) = shade(v);
            Span::styled(glyph.repeat(2), Style::default().fg(color))
        }));
        spans.push(Span::raw(format!(" {:>3.0}%", row[i] * 100.0)));
        lines.push(Line::from(spans));
    }
    lines.push(Line::from("·0 ░<5% ▒<20% ▓<50% █≥50%"));
    lines.push(Line::from(summary));
    lines
}

/// Setup's estimate of the run's peak memory, red where it exceeds what the machine has free.
fn memory_line(e: &crate::config::Experiment, available: Option<u64>) -> Line<'static> {
    use crate::train::footprint::{bytes, Footprint};
    let Some(size) = crate::data::DataSize::expected(&e.data) else {
        return Line::from("Memory: estimated once the data is loaded (set both subsets to see it here)");
    };
    let memory = Footprint::estimate(e, &size);
    let text = format!("Memory: {}", memory.describe());
    match available {
        Some(free) if memory.host(e.train.device) > free => Line::from(Span::styled(
            format!("{text}: more than the {} free; lower the subset or the batch size", bytes(free)),
            Style::default().fg(Color::LightRed),
        )),
        Some(free) => Line::from(format!("{text} of {} free", bytes(free))),
        None => Line::from(text),
    }
}

fn draw_runs_list(f: &mut Frame, app: &App, area: Rect, title: &str) {
    let rows: Vec<Row> = app
        .runs
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mark = if r.checked { "[x]" } else { "[ ]" };
            let acc = r.metrics().last().map(|m| format!("{:.1}%", m.eval_acc * 100.0)).unwrap_or_else(|| "-".into());
            let epochs = format!("{}/{}", r.metrics().len(), r.record.experiment.train.epochs);
            let noise = format!("s={:.0}%", r.record.experiment.data.noise.rate * 100.0);
            let style = if i == app.selected {
                Style::default().fg(run_color(i)).add_modifier(Modifier::REVERSED)
            } else {
                Style::default().fg(run_color(i))
            };
            Row::new(vec![
                mark.to_string(),
                r.label(),
                r.record.experiment.data.dataset.name().to_string(),
                noise,
                r.state_text(),
                epochs,
                acc,
            ])
            .style(style)
        })
        .collect();
    let widths = [
        Constraint::Length(3),
        Constraint::Min(10),
        Constraint::Length(7),
        Constraint::Length(6),
        Constraint::Length(13),
        Constraint::Length(7),
        Constraint::Length(6),
    ];
    let header = Row::new(vec!["", "method", "data", "noise", "state", "epoch", "acc"])
        .style(Style::default().add_modifier(Modifier::DIM));
    let visible = area.height.saturating_sub(3) as usize;
    let skip = (app.selected + 1).saturating_sub(visible.max(1));
    let rows: Vec<Row> = rows.into_iter().skip(skip).collect();
    f.render_widget(Table::new(rows, widths).header(header).block(block(title.to_string())), area);
}

fn draw_live(f: &mut Frame, app: &App, area: Rect) {
    if app.runs.is_empty() {
        let text =
            "No runs yet.\n\nGo to Setup (1), pick a noise rate and a regularizer, press Enter to start one run, \
                    or b for baseline vs your choice side by side.\n\nr loads finished runs from the runs folder.";
        f.render_widget(Paragraph::new(text).wrap(Wrap { trim: true }).block(block(" Live ")), area);
        return;
    }
    let list_h = (app.runs.len() as u16 + 3).min(area.height / 4).max(4);
    let log_h = if area.height >= 30 { 6 } else { 3 };
    let [list, charts, progress, log] = Layout::vertical([
        Constraint::Length(list_h),
        Constraint::Min(6),
        Constraint::Length(1),
        Constraint::Length(log_h),
    ])
    .areas(area);
    draw_runs_list(f, app, list, " Runs (space: overlay) ");
    let run = &app.runs[app.selected.min(app.runs.len() - 1)];
    // Side by side unless there is height to spare: each chart gets more rows that way.
    let direction = if charts.height >= 30 { Direction::Vertical } else { Direction::Horizontal };
    let [loss_area, acc_area] = Layout::default()
        .direction(direction)
        .constraints([Constraint::Percentage(55), Constraint::Percentage(45)])
        .areas(charts);
    draw_loss_chart(f, app, loss_area);
    if run.metrics().last().is_some_and(|m| !m.f1.is_empty()) {
        draw_label_sparklines(f, app, run, acc_area);
    } else {
        draw_accuracy_chart(f, app, run, acc_area);
    }
    draw_progress(f, run, progress);
    let lines: Vec<Line> =
        app.log.iter().rev().take(log_h.saturating_sub(2) as usize).rev().map(|l| Line::from(l.clone())).collect();
    f.render_widget(Paragraph::new(lines).block(block(" Log ")), log);
}

fn marker(app: &App, ascii: char) -> Marker {
    if app.ascii {
        Marker::Custom(ascii)
    } else {
        Marker::Braille
    }
}

/// Points of one metric over epochs.
fn series(
    metrics: &[crate::train::EpochMetrics],
    pick: impl Fn(&crate::train::EpochMetrics) -> f64,
) -> Vec<(f64, f64)> {
    metrics.iter().map(|m| (m.epoch as f64, pick(m))).filter(|(_, y)| y.is_finite()).collect()
}

/// Where the over-fitting shows: the epoch of lowest eval loss and how far eval loss has risen since.
pub fn overfit_note(metrics: &[crate::train::EpochMetrics]) -> Option<(usize, f64, f64)> {
    let (best_i, best) = metrics
        .iter()
        .enumerate()
        .min_by(|a, b| a.1.eval_loss.partial_cmp(&b.1.eval_loss).unwrap_or(std::cmp::Ordering::Equal))?;
    let last = metrics.last()?;
    Some((metrics[best_i].epoch, best.eval_loss, last.eval_loss - best.eval_loss))
}

fn draw_loss_chart(f: &mut Frame, app: &App, area: Rect) {
    let sel = app.selected.min(app.runs.len() - 1);
    let shown: Vec<usize> = (0..app.runs.len()).filter(|&i| i == sel || app.runs[i].checked).collect();
    let mut data: Vec<Series> = Vec::new();
    let mut min_points = Vec::new();
    for &i in &shown {
        let r = &app.runs[i];
        let c = run_color(i);
        data.push((
            format!("{} train", r.label()),
            series(r.metrics(), |m| m.train_loss),
            Style::default().fg(c).add_modifier(Modifier::DIM),
            marker(app, '.'),
            GraphType::Line,
        ));
        data.push((
            format!("{} eval", r.label()),
            series(r.metrics(), |m| m.eval_loss),
            Style::default().fg(c),
            marker(app, '*'),
            GraphType::Line,
        ));
        if let Some((epoch, loss, _)) = overfit_note(r.metrics()) {
            min_points.push((epoch as f64, loss));
        }
    }
    let title = match overfit_note(app.runs[sel].metrics()) {
        Some((epoch, _, rise)) if rise > 0.05 => Line::from(vec![
            Span::raw(" Loss "),
            Span::styled(
                format!("{} over-fits: eval +{rise:.2} since ep {epoch} ", app.runs[sel].label()),
                Style::default().fg(Color::LightRed).add_modifier(Modifier::BOLD),
            ),
        ]),
        _ => {
            let gap = app.runs[sel].metrics().last().map(|m| format!("gap {:+.2} ", m.gap)).unwrap_or_default();
            Line::from(format!(" Loss (dim: train, bright: eval) {gap}"))
        }
    };
    let min_label = "eval-loss minimum".to_string();
    data.push((
        min_label,
        min_points,
        Style::default().fg(Color::LightRed),
        if app.ascii { Marker::Custom('o') } else { Marker::Dot },
        GraphType::Scatter,
    ));
    render_chart(f, area, title, data, None);
}

fn draw_accuracy_chart(f: &mut Frame, app: &App, run: &RunView, area: Rect) {
    let m = run.metrics();
    let data = vec![
        (
            "eval acc".to_string(),
            series(m, |x| x.eval_acc * 100.0),
            Style::default().fg(Color::Green),
            marker(app, '*'),
            GraphType::Line,
        ),
        (
            "train acc (noisy)".to_string(),
            series(m, |x| x.train_acc * 100.0),
            Style::default().fg(Color::Cyan),
            marker(app, '.'),
            GraphType::Line,
        ),
        (
            "memorised".to_string(),
            series(m, |x| x.memorized * 100.0),
            Style::default().fg(Color::LightRed),
            marker(app, 'x'),
            GraphType::Line,
        ),
    ];
    let last = m.last();
    let title = format!(
        " {} — accuracy %  eval {}  memorised {}{} ",
        run.label(),
        last.map(|x| format!("{:.1}", x.eval_acc * 100.0)).unwrap_or_else(|| "-".into()),
        last.map(|x| format!("{:.1}", x.memorized * 100.0)).unwrap_or_else(|| "-".into()),
        last.map(|x| most_memorised(&x.memorized_per_class, &run.label_names())).unwrap_or_default(),
    );
    render_chart(f, area, Line::from(title), data, Some((0.0, 100.0)));
}

/// The three classes (labels) whose corrupted examples the network memorises most, as
/// "; most cat 81%, dog 70%, bird 64%", so that the screen says which classes it is memorising.
fn most_memorised(per_class: &[Option<f64>], names: &[String]) -> String {
    let mut ranked: Vec<(usize, f64)> = per_class.iter().enumerate().filter_map(|(i, v)| v.map(|v| (i, v))).collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let top: Vec<String> = ranked
        .iter()
        .take(3)
        .filter(|(_, v)| *v > 0.0)
        .map(|&(i, v)| format!("{} {:.0}%", names.get(i).cloned().unwrap_or_else(|| i.to_string()), v * 100.0))
        .collect();
    if top.is_empty() {
        String::new()
    } else {
        format!("; most {}", top.join(", "))
    }
}

/// One sparkline per label (AU): its test F1 over the epochs, and the current value; in as many
/// columns as the height needs.
fn draw_label_sparklines(f: &mut Frame, app: &App, run: &RunView, area: Rect) {
    let m = run.metrics();
    let labels = m.last().map(|x| x.f1.len()).unwrap_or(0);
    let names = run.label_names();
    let rows = (area.height.saturating_sub(2) as usize).max(1);
    let columns = labels.div_ceil(rows).max(1);
    let rows = labels.div_ceil(columns).max(1); // balance the columns
    let col_width = (area.width.saturating_sub(2) as usize / columns).max(12);
    // name (5) + space + sparkline + value (6) + gap (1)
    let spark_width = col_width.saturating_sub(13).max(1);
    let mut lines: Vec<Vec<Span>> = vec![Vec::new(); rows.min(labels)];
    for j in 0..labels {
        let values: Vec<f64> = m.iter().map(|x| x.f1.get(j).copied().unwrap_or(0.0)).collect();
        let now = values.last().copied().unwrap_or(0.0);
        let colour = if now >= 0.6 {
            Color::Green
        } else if now >= 0.4 {
            Color::Yellow
        } else {
            Color::LightRed
        };
        let line = &mut lines[j % rows];
        line.push(Span::raw(format!("{:<5} ", names.get(j).cloned().unwrap_or_else(|| format!("L{j}")))));
        line.push(Span::styled(
            format!("{:<spark_width$}", sparkline(&values, spark_width, app.ascii)),
            Style::default().fg(colour),
        ));
        line.push(Span::raw(format!("{:>5.1}  ", now * 100.0)));
    }
    let avg = m.last().map(|x| x.eval_acc * 100.0).unwrap_or(0.0);
    let title = format!(" {} - F1 per AU (avg {avg:.1}) ", run.label());
    f.render_widget(Paragraph::new(lines.into_iter().map(Line::from).collect::<Vec<_>>()).block(block(title)), area);
}

/// The last `width` values (0..1) as block characters, or ASCII shades.
pub fn sparkline(values: &[f64], width: usize, ascii: bool) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    const SHADES: [char; 8] = ['_', '.', ':', '-', '=', '+', '*', '#'];
    let set = if ascii { SHADES } else { BARS };
    let start = values.len().saturating_sub(width);
    values[start..].iter().map(|v| set[((v.clamp(0.0, 1.0) * 7.0).round()) as usize]).collect()
}

type Series = (String, Vec<(f64, f64)>, Style, Marker, GraphType);

fn render_chart(f: &mut Frame, area: Rect, title: Line, data: Vec<Series>, y_fixed: Option<(f64, f64)>) {
    let max_x = data.iter().flat_map(|d| d.1.iter().map(|p| p.0)).fold(1.0f64, f64::max);
    let (lo, hi) = y_fixed.unwrap_or_else(|| {
        let ys: Vec<f64> = data.iter().flat_map(|d| d.1.iter().map(|p| p.1)).collect();
        let lo = ys.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = ys.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        if lo.is_finite() && hi.is_finite() {
            let pad = ((hi - lo) * 0.08).max(0.01);
            ((lo - pad).max(0.0), hi + pad)
        } else {
            (0.0, 1.0)
        }
    });
    let datasets: Vec<Dataset> = data
        .iter()
        .filter(|d| !d.1.is_empty())
        .map(|(name, points, style, marker, kind)| {
            Dataset::default().name(name.clone()).data(points).style(*style).marker(*marker).graph_type(*kind)
        })
        .collect();
    let fmt = |v: f64| {
        if hi - lo >= 10.0 {
            format!("{v:.0}")
        } else {
            format!("{v:.2}")
        }
    };
    let chart = Chart::new(datasets)
        .block(block(title))
        .x_axis(
            Axis::default()
                .bounds([1.0, max_x.max(2.0)])
                .labels(vec![Span::raw("1"), Span::raw(format!("epoch {}", max_x as usize))])
                .style(Style::default().add_modifier(Modifier::DIM)),
        )
        .y_axis(
            Axis::default()
                .bounds([lo, hi])
                .labels(vec![Span::raw(fmt(lo)), Span::raw(fmt((lo + hi) / 2.0)), Span::raw(fmt(hi))])
                .style(Style::default().add_modifier(Modifier::DIM)),
        )
        .hidden_legend_constraints((Constraint::Ratio(1, 3), Constraint::Ratio(1, 3)));
    f.render_widget(chart, area);
}

fn draw_progress(f: &mut Frame, run: &RunView, area: Rect) {
    let epochs = run.record.experiment.train.epochs;
    let done = run.metrics().len();
    let batch = match &run.batch {
        Some(b) if run.state != RunState::Done && b.epoch > done => {
            format!(" batch {}/{}", b.batch, b.batches)
        }
        _ => String::new(),
    };
    let speed = run
        .batch
        .as_ref()
        .map(|b| b.images_per_sec)
        .or_else(|| run.metrics().last().map(|m| m.images_per_sec))
        .map(|s| format!("{s:.0} img/s"))
        .unwrap_or_default();
    let eta = run.eta_secs().map(|s| format!("ETA {}:{:02}", s as u64 / 60, s as u64 % 60)).unwrap_or_default();
    let width = 20usize;
    let filled = (run.progress() * width as f64).round() as usize;
    let bar = format!("[{}{}]", "#".repeat(filled), "-".repeat(width - filled));
    let text = format!(" {} {bar} epoch {done}/{epochs}{batch}  {speed}  {eta}", run.state_text());
    f.render_widget(Paragraph::new(text), area);
}

fn draw_compare(f: &mut Frame, app: &App, area: Rect) {
    if app.runs.is_empty() {
        let text = "Nothing to compare yet.\n\nr loads the finished runs in the runs folder; \
                    `qat-lab compare runs/a runs/b` opens chosen ones; runs started in the lab appear here too.";
        f.render_widget(Paragraph::new(text).wrap(Wrap { trim: true }).block(block(" Compare ")), area);
        return;
    }
    let table_h = (app.runs.len() as u16 + 3).min(area.height / 2).max(5);
    let [chart_area, table_area] = Layout::vertical([Constraint::Min(6), Constraint::Length(table_h)]).areas(area);
    let mut data = Vec::new();
    for (i, r) in app.runs.iter().enumerate().filter(|(_, r)| r.checked) {
        let pts = if app.compare_acc {
            series(r.metrics(), |m| m.eval_acc * 100.0)
        } else {
            series(r.metrics(), |m| m.eval_loss)
        };
        let name = format!("{} s={:.0}%", r.label(), r.record.experiment.data.noise.rate * 100.0);
        data.push((name, pts, Style::default().fg(run_color(i)), marker(app, '*'), GraphType::Line));
    }
    let multi = app.runs.iter().any(|r| r.checked && r.metrics().last().is_some_and(|m| !m.f1.is_empty()));
    let title = match (app.compare_acc, multi) {
        (true, false) => " Eval accuracy % (m: loss) ",
        (true, true) => " Eval average F1 % (m: loss) ",
        (false, _) => " Eval loss (m: accuracy) ",
    };
    render_chart(f, chart_area, Line::from(title), data, None);

    let records: Vec<_> = app.runs.iter().map(|r| r.record.clone()).collect();
    let checked: Vec<_> = app.runs.iter().filter(|r| r.checked).map(|r| r.record.clone()).collect();
    if checked.iter().any(|r| report::label_f1(r).is_some()) {
        draw_table1(f, &checked, table_area);
        return;
    }
    let rows: Vec<(Vec<String>, Style)> = app
        .runs
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let rec = &r.record;
            let fin = report::final_acc(rec);
            let gain =
                report::gain_vs_baseline(&records, rec).map(|g| format!("{g:+.2}")).unwrap_or_else(|| "-".into());
            let best =
                r.summary().and_then(|s| s.best.as_ref()).map(|b| format!("{:.2}@{}", b.eval_acc * 100.0, b.epoch));
            let best = best.or_else(|| {
                r.metrics()
                    .iter()
                    .max_by(|a, b| a.eval_acc.partial_cmp(&b.eval_acc).unwrap_or(std::cmp::Ordering::Equal))
                    .map(|m| format!("{:.2}@{}", m.eval_acc * 100.0, m.epoch))
            });
            let last = r.metrics().last();
            let style = if i == app.selected {
                Style::default().fg(run_color(i)).add_modifier(Modifier::REVERSED)
            } else {
                Style::default().fg(run_color(i))
            };
            let cells = vec![
                if r.checked { "[x]" } else { "[ ]" }.to_string(),
                r.label(),
                format!("{:.0}%", rec.experiment.data.noise.rate * 100.0),
                r.state_text(),
                fin.map(|a| format!("{:.2}", a * 100.0)).unwrap_or_else(|| "-".into()),
                best.unwrap_or_else(|| "-".into()),
                gain,
                last.map(|m| format!("{:.3}", m.eval_loss)).unwrap_or_else(|| "-".into()),
                last.map(|m| format!("{:.0}", m.memorized * 100.0)).unwrap_or_else(|| "-".into()),
                report::size_cell(rec, true),
            ];
            (cells, style)
        })
        .collect();
    let header_cells = ["", "method", "noise", "state", "final%", "best%@ep", "gain", "eval loss", "memo%", "KiB"];
    let widths = [
        Constraint::Length(3),
        Constraint::Min(10),
        Constraint::Length(5),
        Constraint::Length(13),
        Constraint::Length(6),
        Constraint::Length(9),
        Constraint::Length(6),
        Constraint::Length(9),
        Constraint::Length(5),
        Constraint::Length(10),
    ];
    // The size column where the screen has room for it (it is in `report` and `compare --table`).
    let columns = if table_area.width >= 100 { widths.len() } else { widths.len() - 1 };
    let widths = &widths[..columns];
    let header = Row::new(header_cells[..columns].to_vec()).style(Style::default().add_modifier(Modifier::BOLD));
    let rows: Vec<Row> = rows
        .into_iter()
        .map(|(mut cells, style)| {
            Row::new({
                cells.truncate(columns);
                cells
            })
            .style(style)
        })
        .collect();
    let visible = table_area.height.saturating_sub(3) as usize;
    let skip = (app.selected + 1).saturating_sub(visible.max(1));
    let rows: Vec<Row> = rows.into_iter().skip(skip).collect();
    f.render_widget(
        Table::new(rows, widths.to_vec())
            .header(header)
            .block(block(" Final and best test accuracy; gain = final − baseline on the same noise ")),
        table_area,
    );
}

/// Table 1's title; it counts the runs kept out of the means (running, stopped, diverged).
fn table1_title(records: &[crate::runs::RunRecord]) -> String {
    let left_out = records.iter().filter(|r| !r.finished_ok() && report::label_f1(r).is_some()).count();
    match left_out {
        0 => " Per-AU F1 (%), mean over runs: the paper's Table 1 ".into(),
        n => format!(" Per-AU F1 (%), mean over finished runs ({n} unfinished left out): Table 1 "),
    }
}

/// The paper's Table 1 layout: per-AU F1 of each method (mean over its runs) and the average.
fn draw_table1(f: &mut Frame, records: &[crate::runs::RunRecord], area: Rect) {
    let rows = report::table1_rows(records);
    let Some(first) = rows.first() else { return };
    let labels = first.f1.len();
    let names = records.first().map(|r| r.label_names()).unwrap_or_default();
    let mut header = vec!["F1 %".to_string()];
    header.extend(names.iter().take(labels).map(|n| n.trim_start_matches("AU").to_string()));
    header.extend(["Avg.".to_string(), "runs".to_string()]);
    let mut widths = vec![Constraint::Length(12)];
    widths.extend(std::iter::repeat_n(Constraint::Length(5), labels));
    widths.extend([Constraint::Length(11), Constraint::Length(4)]);
    let body = rows.iter().map(|r| {
        let mut cells = vec![r.method.clone()];
        cells.extend(r.f1.iter().map(|v| format!("{v:.1}")));
        cells.extend([r.average_text(), r.runs.to_string()]);
        Row::new(cells)
    });
    let table = Table::new(body, widths)
        .header(Row::new(header).style(Style::default().add_modifier(Modifier::BOLD)))
        .column_spacing(0)
        .block(block(table1_title(records)));
    f.render_widget(table, area);
}

fn draw_help(f: &mut Frame, area: Rect) {
    let text = "\
Screens   1 Setup   2 Live   3 Compare   Tab next
Setup     ↑↓ field   ←→ value   Enter start run
          b baseline vs this   a all methods, same data
          Enter on Data path: type a folder, Enter ends
Runs      ↑↓ select   space overlay/include   p pause/resume
          x stop (record kept)   d remove from view
          r load runs/ from disk   m compare acc/loss
Display   g ASCII/braille charts   ? this help
Quit      q (asks first while runs are training)

Charts: dim = train loss on the noisy labels, bright = eval
loss on clean test labels; o marks each run's lowest eval
loss. A rising eval loss while train loss falls is
over-fitting: the model memorises the wrong labels.";
    popup(f, area, " Help (any key closes) ", text, 64, 18);
}

fn popup(f: &mut Frame, area: Rect, title: &str, text: &str, w: u16, h: u16) {
    let w = w.min(area.width);
    let h = h.min(area.height);
    let rect = Rect { x: area.x + (area.width - w) / 2, y: area.y + (area.height - h) / 2, width: w, height: h };
    f.render_widget(Clear, rect);
    f.render_widget(
        Paragraph::new(text.to_string()).wrap(Wrap { trim: false }).block(block(title.to_string()).bold()),
        rect,
    );
}
