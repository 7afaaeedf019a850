"""Realistic JSON schemas for benchmarks/structured.py, with variations: each call of
`make_schemas(n, rng)` returns n distinct schemas (different fields, bounds, enums and
names), all bounded (strings with maxLength, arrays with maxItems, integers with bounds,
no additional properties) so a random-weight model's outputs end."""
from __future__ import annotations

import random


def _s(max_len: int) -> dict:
    return {"type": "string", "maxLength": max_len}


def _i(lo: int, hi: int) -> dict:
    return {"type": "integer", "minimum": lo, "maximum": hi}


def _obj(props: dict, rng: random.Random, optional: int = 0) -> dict:
    names = list(props)
    required = names if optional == 0 else rng.sample(names, max(1, len(names) - optional))
    return {"type": "object", "properties": props, "required": [n for n in names if n in required],
            "additionalProperties": False}


def user(rng):
    return {"name": _s(rng.randint(8, 24)), "age": _i(0, rng.choice([99, 120, 150])),
            "email": _s(rng.randint(16, 40)), "role": {"enum": rng.sample(["admin", "editor", "viewer", "guest", "owner"], 3)},
            "active": {"type": "boolean"}}


def address(rng):
    return {"street": _s(rng.randint(16, 32)), "city": _s(rng.randint(8, 20)),
            "zip": {"type": "string", "pattern": r"[0-9]{5}"}, "country": {"enum": ["PT", "FR", "DE", "JP", "US"][:rng.randint(2, 5)]}}


def order(rng):
    item = _obj({"sku": _s(12), "quantity": _i(1, rng.choice([9, 20, 99])), "price_cents": _i(0, 100000)}, rng)
    return {"order_id": _s(16), "items": {"type": "array", "items": item, "maxItems": rng.randint(2, 5)},
            "status": {"enum": ["pending", "paid", "shipped", "cancelled"]}, "gift": {"type": "boolean"}}


def weather(rng):
    return {"city": _s(20), "temperature_c": _i(-40, 50), "condition": {"enum": ["sunny", "cloudy", "rain", "snow", "fog"]},
            "humidity_pct": _i(0, 100), "wind_kph": _i(0, rng.choice([80, 150, 200]))}


def event(rng):
    return {"title": _s(rng.randint(20, 48)), "date": {"type": "string", "pattern": r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"},
            "attendees": {"type": "array", "items": _s(24), "maxItems": rng.randint(2, 6)},
            "online": {"type": "boolean"}, "duration_min": _i(5, 480)}


def tool_call(rng):
    fn = rng.choice(["get_weather", "search_flights", "create_ticket", "send_email", "lookup_order"])
    args = {"query": _s(rng.randint(16, 64)), "limit": _i(1, rng.choice([10, 50, 100])),
            "sort": {"enum": ["asc", "desc"]}}
    return {"name": {"enum": [fn]}, "arguments": _obj(args, rng, optional=rng.randint(0, 1))}


def bug_report(rng):
    return {"summary": _s(rng.randint(30, 80)), "severity": {"enum": ["low", "medium", "high", "critical"]},
            "steps": {"type": "array", "items": _s(40), "maxItems": rng.randint(2, 4)},
            "component": {"enum": rng.sample(["auth", "ui", "api", "db", "billing", "search"], 4)}}


def recipe(rng):
    ingredient = _obj({"name": _s(20), "grams": _i(1, 2000)}, rng)
    return {"title": _s(32), "servings": _i(1, 12), "vegetarian": {"type": "boolean"},
            "ingredients": {"type": "array", "items": ingredient, "maxItems": rng.randint(2, 5)}}


TEMPLATES = [user, address, order, weather, event, tool_call, bug_report, recipe]


def make_schemas(n: int, rng: random.Random) -> list[dict]:
    """n distinct schemas: a template's fields (some optional), sometimes nested under a
    wrapper key, with a field of a variant name so no two are the same."""
    out, seen = [], set()
    while len(out) < n:
        template = rng.choice(TEMPLATES)
        props = template(rng)
        props[f"note_{len(out)}"] = _s(rng.randint(4, 16))  # every schema its own
        schema = _obj(props, rng, optional=rng.randint(0, 2))
        if rng.random() < 0.3:
            schema = _obj({template.__name__: schema, "confidence": _i(0, 100)}, rng)
        key = repr(schema)
        if key not in seen:
            seen.add(key)
            out.append(schema)
    return out
