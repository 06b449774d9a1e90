"""`thermal-analysis` in Python: the same compute component as guests/thermal-analysis.

For each twin it reads `temperature` (and an optional `temperatures` array of recent
readings), and returns count, min, max, mean, standard deviation, and the readings whose
z-score exceeds `parameters.z` (default 2.0) or whose value exceeds `parameters.threshold`
(default 85) as anomalies.

In a workflow, the results of the steps it depends on (`parameters.inputs`) are readings too:
each input that is a number, an array of numbers, or an object whose values are numbers (an
aggregate's `collect_property`), in key order after the twins' readings.

Built with componentize-py (scripts/build-guests.sh), which generates the `wit_world`
bindings for the `compute` world of wit/platform.wit while it builds.
"""

import json
import math

import wit_world
from componentize_py_types import Err
from wit_world.imports import host


def number(value):
    """The value as a float if it is a JSON number (not a bool), else None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def plain_sum(values):
    """Left-to-right sum like the Rust guest (Python 3.12+ `sum` compensates rounding)."""
    total = 0.0
    for x in values:
        total += x
    return total


class WitWorld(wit_world.WitWorld):
    def run(self, twins, parameters):
        parameters = json.loads(parameters)
        if not isinstance(parameters, dict):
            parameters = {}
        z_limit = number(parameters.get("z"))
        z_limit = 2.0 if z_limit is None else z_limit
        threshold = number(parameters.get("threshold"))
        threshold = 85.0 if threshold is None else threshold

        readings = []
        for twin in twins:
            properties = json.loads(twin.properties)
            if not isinstance(properties, dict):
                raise Err(f"twin {twin.id}: properties are not an object")
            listed = properties.get("temperatures")
            if isinstance(listed, list):
                readings += [x for x in map(number, listed) if x is not None]
            current = number(properties.get("temperature"))
            if current is not None:
                readings.append(current)
        inputs = parameters.get("inputs")
        if isinstance(inputs, dict):
            for value in inputs.values():
                if isinstance(value, list):
                    readings += [x for x in map(number, value) if x is not None]
                elif isinstance(value, dict):
                    readings += [x for x in map(number, value.values()) if x is not None]
                elif number(value) is not None:
                    readings.append(number(value))
        if not readings:
            raise Err("no temperature readings in the given twins")

        n = len(readings)
        mean = plain_sum(readings) / n
        sd = math.sqrt(plain_sum((x - mean) * (x - mean) for x in readings) / n)
        anomalies = [
            x for x in readings
            if x > threshold or (sd > 0.0 and abs((x - mean) / sd) > z_limit)
        ]
        if anomalies:
            host.log(host.Level.INFO, f"{len(anomalies)} anomalous readings")
        return json.dumps({
            "count": n, "min": min(readings), "max": max(readings), "mean": mean, "stddev": sd,
            "anomalies": anomalies, "over_threshold": sum(1 for x in readings if x > threshold),
        })
