//! `thermal-analysis`: the seed's `analyze_patterns` as a compute component.
//!
//! For each twin it reads `temperature` (and an optional `temperatures` array of recent
//! readings), and returns count, min, max, mean, standard deviation, and the readings whose
//! z-score exceeds `parameters.z` (default 2.0) or whose value exceeds
//! `parameters.threshold` (default 85) as anomalies.

wit_bindgen::generate!({
    path: "../../wit",
    world: "compute",
});

use serde_json::{json, Value};
use twinhost::platform::host::{log, Level};

struct ThermalAnalysis;

impl Guest for ThermalAnalysis {
    fn run(twins: Vec<Twin>, parameters: String) -> Result<String, String> {
        let params: Value =
            serde_json::from_str(&parameters).map_err(|e| format!("parameters: {e}"))?;
        let z_limit = params.get("z").and_then(Value::as_f64).unwrap_or(2.0);
        let threshold = params
            .get("threshold")
            .and_then(Value::as_f64)
            .unwrap_or(85.0);
        let mut readings = Vec::new();
        for t in &twins {
            let props: Value =
                serde_json::from_str(&t.properties).map_err(|e| format!("twin {}: {e}", t.id))?;
            if let Some(list) = props.get("temperatures").and_then(Value::as_array) {
                readings.extend(list.iter().filter_map(Value::as_f64));
            }
            if let Some(x) = props.get("temperature").and_then(Value::as_f64) {
                readings.push(x);
            }
        }
        if readings.is_empty() {
            return Err("no temperature readings in the given twins".into());
        }
        let n = readings.len() as f64;
        let mean = readings.iter().sum::<f64>() / n;
        let var = readings.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        let sd = var.sqrt();
        let min = readings.iter().copied().fold(f64::INFINITY, f64::min);
        let max = readings.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let anomalies: Vec<f64> = readings
            .iter()
            .copied()
            .filter(|x| x > &threshold || (sd > 0.0 && ((x - mean) / sd).abs() > z_limit))
            .collect();
        if !anomalies.is_empty() {
            log(
                Level::Info,
                &format!("{} anomalous readings", anomalies.len()),
            );
        }
        Ok(json!({
            "count": readings.len(), "min": min, "max": max, "mean": mean, "stddev": sd,
            "anomalies": anomalies, "over_threshold": readings.iter().filter(|x| **x > threshold).count(),
        })
        .to_string())
    }
}

export!(ThermalAnalysis);
