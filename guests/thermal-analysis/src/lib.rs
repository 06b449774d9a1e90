//! `thermal-analysis`: the seed's `analyze_patterns` as a compute component.
//!
//! For each twin it reads `temperature` (and an optional `temperatures` array of recent
//! readings), and returns count, min, max, mean, standard deviation, and the readings whose
//! z-score exceeds `parameters.z` (default 2.0) or whose value exceeds
//! `parameters.threshold` (default 85) as anomalies.
//!
//! In a workflow, the results of the steps it depends on (`parameters.inputs`) are readings
//! too: each input that is a number, an array of numbers, or an object whose values are
//! numbers (an aggregate's `collect_property`), in key order after the twins' readings.

use twinhost_sdk::serde_json::json;
use twinhost_sdk::{log, Compute, Level, Twin, Value};

struct ThermalAnalysis;

impl Compute for ThermalAnalysis {
    fn run(twins: Vec<Twin>, parameters: Value) -> Result<Value, String> {
        let z_limit = parameters.get("z").and_then(Value::as_f64).unwrap_or(2.0);
        let threshold = parameters
            .get("threshold")
            .and_then(Value::as_f64)
            .unwrap_or(85.0);
        let mut readings = Vec::new();
        for t in &twins {
            if let Some(list) = t.properties.get("temperatures").and_then(Value::as_array) {
                readings.extend(list.iter().filter_map(Value::as_f64));
            }
            readings.extend(t.number("temperature"));
        }
        if let Some(inputs) = parameters.get("inputs").and_then(Value::as_object) {
            for v in inputs.values() {
                match v {
                    Value::Array(a) => readings.extend(a.iter().filter_map(Value::as_f64)),
                    Value::Object(m) => readings.extend(m.values().filter_map(Value::as_f64)),
                    other => readings.extend(other.as_f64()),
                }
            }
        }
        if readings.is_empty() {
            return Err("no temperature readings in the given twins".into());
        }
        let n = readings.len() as f64;
        let mean = readings.iter().sum::<f64>() / n;
        let sd = (readings.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
        let min = readings.iter().copied().fold(f64::INFINITY, f64::min);
        let max = readings.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let anomalies: Vec<f64> = readings
            .iter()
            .copied()
            .filter(|x| *x > threshold || (sd > 0.0 && ((x - mean) / sd).abs() > z_limit))
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
        }))
    }
}

twinhost_sdk::export_compute!(ThermalAnalysis);
