//! Run records (`--record F.json`) and the self-contained HTML report (`--report F.html`).
//!
//! A [`RunRecord`] is everything a run leaves behind: the prompt, the configuration, the
//! per-step records (ESS, resampling, lineage, weights, texts) and the final posterior. It
//! serialises to JSON (`-inf` log-values as `null`) and renders to one HTML file with inline
//! CSS, SVG and JavaScript — no network access — showing ESS and `log Z` over the steps, the
//! particles' ancestry tree with resampling events (click a particle for its text and weight
//! history), and the posterior as bars.

use serde::{Deserialize, Serialize};

use crate::inference::record::{log_value, StepRecord};
use crate::inference::result::{Distinct, SmcResult};
use crate::inference::smc::SmcConfig;

/// Format version of [`RunRecord`].
pub const RECORD_VERSION: u32 = 1;

/// Everything a run leaves behind; the schema of `--record` files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// [`RECORD_VERSION`].
    pub version: u32,
    /// The prompt as text.
    pub prompt: String,
    /// Human-readable descriptions of the constraints and potentials.
    pub constraints: Vec<String>,
    /// The run's configuration.
    pub config: SmcConfig,
    /// One record per SMC step.
    pub steps: Vec<StepRecord>,
    /// Distinct completions, most probable first.
    pub completions: Vec<Distinct>,
    /// Estimate of `log Z` (`null` = `-inf`).
    #[serde(with = "log_value")]
    pub log_z: f64,
    /// Final effective sample size.
    pub ess: f64,
    /// Whether every particle died.
    pub all_dead: bool,
    /// Tokens generated.
    pub tokens_generated: usize,
    /// Wall time in seconds.
    pub elapsed_s: f64,
}

impl RunRecord {
    /// Collect a run's record (its per-step records need [`SmcConfig::record`]; texts need
    /// [`SmcConfig::record_text`]).
    pub fn from_result<P>(
        prompt: &str,
        constraints: Vec<String>,
        config: &SmcConfig,
        result: &SmcResult<P>,
    ) -> Self {
        let completions = result.posterior_by_bytes();
        Self {
            version: RECORD_VERSION,
            prompt: prompt.to_string(),
            constraints,
            config: config.clone(),
            steps: result.records.clone(),
            completions,
            log_z: result.log_z,
            ess: result.ess,
            all_dead: result.all_dead,
            tokens_generated: result.tokens_generated,
            elapsed_s: result.elapsed_s,
        }
    }

    /// The record as pretty JSON.
    ///
    /// # Errors
    /// [`crate::SmcError::InvalidConfig`] if serialisation fails (it does not for valid
    /// records).
    pub fn to_json(&self) -> crate::Result<String> {
        serde_json::to_string_pretty(self)
            .map_err(|e| crate::SmcError::InvalidConfig(e.to_string()))
    }

    /// The self-contained HTML report.
    pub fn to_html(&self) -> String {
        render_html(self)
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn fmt_log(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.3}")
    } else {
        "−∞".to_string()
    }
}

/// A line chart of `values` (non-finite points are skipped) as an SVG element.
fn line_chart(id: &str, title: &str, values: &[f64], markers: &[bool]) -> String {
    let (w, h, pad) = (640.0, 200.0, 36.0);
    let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    let (lo, hi) = finite
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(*v), b.max(*v))
        });
    let (lo, hi) = if finite.is_empty() {
        (0.0, 1.0)
    } else if hi - lo < 1e-9 {
        (lo - 0.5, hi + 0.5)
    } else {
        (lo, hi)
    };
    let n = values.len().max(2) as f64 - 1.0;
    let x = |i: usize| pad + (w - 2.0 * pad) * i as f64 / n;
    let y = |v: f64| h - pad - (h - 2.0 * pad) * (v - lo) / (hi - lo);
    let mut d = String::new();
    let mut pen = false;
    for (i, v) in values.iter().enumerate() {
        if v.is_finite() {
            d.push_str(&format!(
                "{}{:.1},{:.1} ",
                if pen { "L" } else { "M" },
                x(i),
                y(*v)
            ));
            pen = true;
        } else {
            pen = false;
        }
    }
    let mut marks = String::new();
    for (i, m) in markers.iter().enumerate() {
        if *m && values.get(i).is_some_and(|v| v.is_finite()) {
            marks.push_str(&format!(
                "<circle class=\"resample-mark\" cx=\"{:.1}\" cy=\"{:.1}\" r=\"3.5\"><title>step {i}: resampled</title></circle>",
                x(i),
                y(values[i])
            ));
        }
    }
    format!(
        "<svg id=\"{id}\" class=\"chart\" viewBox=\"0 0 {w} {h}\" role=\"img\" aria-label=\"{title}\">\
<text x=\"{pad}\" y=\"16\" class=\"axis-title\">{title}</text>\
<line x1=\"{pad}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" class=\"axis\"/><line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{b}\" class=\"axis\"/>\
<text x=\"2\" y=\"{ty}\" class=\"tick\">{hi:.2}</text><text x=\"2\" y=\"{b}\" class=\"tick\">{lo:.2}</text>\
<text x=\"{r}\" y=\"{lb}\" class=\"tick\" text-anchor=\"end\">step {last}</text>\
<path class=\"line\" d=\"{d}\"/>{marks}</svg>",
        b = h - pad,
        r = w - pad,
        ty = pad + 4.0,
        lb = h - pad + 16.0,
        last = values.len().saturating_sub(1),
    )
}

/// The ancestry tree: one column per step, one dot per particle, a line to its parent.
fn tree(steps: &[StepRecord]) -> String {
    let rows = steps
        .iter()
        .map(|s| s.log_weights.len())
        .max()
        .unwrap_or(0)
        .max(1);
    let (dx, dy, pad) = (28.0, 14.0, 20.0);
    let w = pad * 2.0 + dx * steps.len().max(1) as f64;
    let h = pad * 2.0 + dy * rows as f64;
    let mut out = format!(
        "<svg id=\"tree\" viewBox=\"0 0 {w:.0} {h:.0}\" width=\"{w:.0}\" height=\"{h:.0}\">"
    );
    for (t, s) in steps.iter().enumerate() {
        if s.resampled {
            out.push_str(&format!(
                "<rect class=\"resample-band\" x=\"{:.1}\" y=\"4\" width=\"{:.1}\" height=\"{:.1}\"><title>step {t}: resampled</title></rect>",
                pad + dx * t as f64 + dx * 0.55,
                dx * 0.3,
                h - 8.0
            ));
        }
    }
    for (t, s) in steps.iter().enumerate().skip(1) {
        for (i, &parent) in s.parents.iter().enumerate() {
            out.push_str(&format!(
                "<line class=\"edge\" x1=\"{:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\"/>",
                pad + dx * (t - 1) as f64,
                pad + dy * parent as f64,
                pad + dx * t as f64,
                pad + dy * i as f64
            ));
        }
    }
    for (t, s) in steps.iter().enumerate() {
        let max = s
            .log_weights
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max);
        for (i, lw) in s.log_weights.iter().enumerate() {
            // Radius grows with the normalised weight; dead particles are hollow.
            let rel = if lw.is_finite() && max.is_finite() {
                (lw - max).exp()
            } else {
                0.0
            };
            let class = if lw.is_finite() { "node" } else { "node dead" };
            out.push_str(&format!(
                "<circle class=\"{class}\" data-step=\"{t}\" data-i=\"{i}\" cx=\"{:.1}\" cy=\"{:.1}\" r=\"{:.1}\"/>",
                pad + dx * t as f64,
                pad + dy * i as f64,
                2.0 + 3.5 * rel.sqrt()
            ));
        }
    }
    out.push_str("</svg>");
    out
}

fn bars(completions: &[Distinct]) -> String {
    let mut out = String::from("<div id=\"posterior-bars\">");
    for c in completions.iter().take(30) {
        out.push_str(&format!(
            "<div class=\"bar-row\"><div class=\"bar-label\" title=\"{t}\">{t}{eos}</div>\
<div class=\"bar-track\"><div class=\"bar\" style=\"width:{pct:.2}%\"></div></div><div class=\"bar-value\">{p:.4}</div></div>",
            t = if c.text.is_empty() { "(empty)".to_string() } else { esc(&c.text) },
            eos = if c.eos { " <span class=\"eos\">⏎</span>" } else { "" },
            pct = 100.0 * c.probability,
            p = c.probability
        ));
    }
    if completions.is_empty() {
        out.push_str("<p class=\"empty\">No completion has positive weight.</p>");
    }
    out.push_str("</div>");
    out
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1d2430;max-width:1100px}\
h1{font-size:20px}h2{font-size:16px;margin-top:28px}.summary td{padding:2px 12px 2px 0}\
.chart{width:100%;max-width:640px;background:#fafbfc;border:1px solid #e3e6ea}\
.axis{stroke:#9aa4b0}.tick,.axis-title{font-size:11px;fill:#56606c}.line{fill:none;stroke:#2f6fde;stroke-width:2}\
.resample-mark{fill:#e0662f}#tree-wrap{overflow:auto;border:1px solid #e3e6ea;max-height:520px}\
.edge{stroke:#b8c2cc;stroke-width:1}.node{fill:#2f6fde;cursor:pointer}.node.dead{fill:#fff;stroke:#c33}\
.node.selected{fill:#e0662f}.node.lineage{fill:#f0a020}.resample-band{fill:#fde8dc}\
#detail{border:1px solid #e3e6ea;padding:8px 12px;margin-top:8px;min-height:48px;background:#fafbfc}\
#detail pre{white-space:pre-wrap;margin:4px 0}.bar-row{display:flex;align-items:center;margin:2px 0}\
.bar-label{width:420px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap;font-family:monospace}\
.bar-track{flex:1;background:#eef1f4;height:14px;margin:0 8px}.bar{background:#2f6fde;height:14px}\
.bar-value{width:64px;text-align:right;font-family:monospace}.warn{color:#b00020;font-weight:600}.eos{color:#888}";

const SCRIPT: &str = r#"(function(){
var data=JSON.parse(document.getElementById('run-data').textContent);
var steps=data.steps||[];
function fmt(x){return x===null?'−∞':x.toFixed(3);}
function select(t,i){
  document.querySelectorAll('.node.selected,.node.lineage').forEach(function(n){n.classList.remove('selected','lineage');});
  var hist=[];var s=t,k=i;
  while(s>=0&&steps[s]){
    hist.unshift({step:s,i:k,lw:steps[s].log_weights[k],text:steps[s].texts?steps[s].texts[k]:null});
    var n=document.querySelector('.node[data-step="'+s+'"][data-i="'+k+'"]');
    if(n)n.classList.add(s===t?'selected':'lineage');
    k=steps[s].parents[k];s-=1;
  }
  var cur=hist[hist.length-1];
  var d=document.getElementById('detail');
  d.innerHTML='';
  var h=document.createElement('div');h.id='detail-title';
  h.textContent='step '+t+', particle '+i+' — log-weight '+fmt(cur.lw);
  d.appendChild(h);
  var pre=document.createElement('pre');pre.id='detail-text';
  pre.textContent=(cur.text===null||cur.text===undefined)?'(texts not recorded)':data.prompt+cur.text;
  d.appendChild(pre);
  var ul=document.createElement('ol');ul.id='detail-history';ul.start=0;
  hist.forEach(function(e){var li=document.createElement('li');li.textContent='step '+e.step+' (particle '+e.i+'): log-weight '+fmt(e.lw);ul.appendChild(li);});
  d.appendChild(ul);
}
document.querySelectorAll('.node').forEach(function(n){
  n.addEventListener('click',function(){select(+n.getAttribute('data-step'),+n.getAttribute('data-i'));});
});
var m=/select=(\d+),(\d+)/.exec(location.hash);
if(m)select(+m[1],+m[2]);
document.body.setAttribute('data-ready','1');
})();"#;

/// Render the HTML report of a run (one self-contained file).
pub fn render_html(r: &RunRecord) -> String {
    let ess: Vec<f64> = r.steps.iter().map(|s| s.ess).collect();
    let log_z: Vec<f64> = r.steps.iter().map(|s| s.log_z).collect();
    let resampled: Vec<bool> = r.steps.iter().map(|s| s.resampled).collect();
    // JSON inside <script>: `</` must not close the element.
    let data = serde_json::to_string(r)
        .unwrap_or_else(|_| "{}".into())
        .replace("</", "<\\/");
    let dead = if r.all_dead {
        "<p id=\"all-dead\" class=\"warn\">Every particle died: no completion satisfies the constraints (log Z = −∞, empty posterior).</p>"
    } else {
        ""
    };
    let constraints = if r.constraints.is_empty() {
        "none".to_string()
    } else {
        esc(&r.constraints.join("; "))
    };
    let tps = if r.elapsed_s > 0.0 {
        r.tokens_generated as f64 / r.elapsed_s
    } else {
        0.0
    };
    format!(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>smc-steer report</title><style>{STYLE}</style></head><body>\
<h1>smc-steer run</h1>{dead}<table class=\"summary\" id=\"summary\">\
<tr><td>prompt</td><td><code>{prompt}</code></td></tr><tr><td>constraints</td><td>{constraints}</td></tr>\
<tr><td>particles</td><td>{n}</td></tr><tr><td>steps</td><td>{steps}</td></tr>\
<tr><td>log Z</td><td id=\"log-z\">{lz}</td></tr><tr><td>ESS</td><td>{ess_final:.2}</td></tr>\
<tr><td>tokens/s</td><td>{tps:.1}</td></tr></table>\
<h2>Effective sample size</h2>{ess_chart}<h2>log Z estimate</h2>{lz_chart}\
<h2>Ancestry</h2><p>Each column is a step, each dot a particle (size: weight; hollow: dead), lines join particles to their parents; shaded bands mark resampling. Click a particle for its text and weight history.</p>\
<div id=\"tree-wrap\">{tree}</div><div id=\"detail\"><em>Click a particle.</em></div>\
<h2>Posterior</h2>{bars}\
<script type=\"application/json\" id=\"run-data\">{data}</script><script>{SCRIPT}</script></body></html>",
        prompt = esc(&r.prompt),
        n = r.config.particles,
        steps = r.steps.len(),
        lz = fmt_log(r.log_z),
        ess_final = r.ess,
        ess_chart = line_chart("ess-chart", "ESS per step (dots: resampled)", &ess, &resampled),
        lz_chart = line_chart("logz-chart", "running log Z", &log_z, &resampled),
        tree = tree(&r.steps),
        bars = bars(&r.completions),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::potential::Hard;
    use crate::testing::ToyKernel;
    use crate::{FeynmanKac, Smc};

    fn record(hard: Hard) -> RunRecord {
        let config = SmcConfig {
            particles: 8,
            max_tokens: 4,
            record: true,
            record_text: true,
            ..SmcConfig::default()
        };
        let k = ToyKernel::random_bigram(3, 0.3, 5).unwrap();
        let r = Smc::new(k, FeynmanKac::new(hard), &[], config.clone())
            .unwrap()
            .run()
            .unwrap();
        RunRecord::from_result("<p>", vec!["test".into()], &config, &r)
    }

    #[test]
    fn record_round_trips_and_html_is_self_contained() {
        let r = record(Hard::on_text("no-c", |t: &str| !t.contains('c')));
        let json = r.to_json().unwrap();
        let back: RunRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
        let total: f64 = r.completions.iter().map(|c| c.probability).sum();
        assert!((total - 1.0).abs() < 1e-9);
        let html = r.to_html();
        assert!(html.contains("id=\"ess-chart\"") && html.contains("class=\"node"));
        assert!(
            !html.contains("http://") && !html.contains("https://"),
            "no network references"
        );
        assert!(html.contains("&lt;p&gt;"), "the prompt is escaped");
    }

    #[test]
    fn all_dead_report_renders() {
        let r = record(Hard::on_tokens("never", |_| false));
        assert!(r.all_dead && r.completions.is_empty());
        let html = r.to_html();
        assert!(html.contains("id=\"all-dead\""));
        let back: RunRecord = serde_json::from_str(&r.to_json().unwrap()).unwrap();
        assert_eq!(back.log_z, f64::NEG_INFINITY);
    }
}
