"""Export journaled LLM queries as fine-tuning examples with what the market did next.

Each JSONL line: the chat messages (system, user), the model's answer, the parsed action and
confidences, and the realised outcome over the next ``horizon`` bars from the decisions table
(forward change and the maximum favourable/adverse move, in points), plus the action that would
have been right in hindsight (BUY or SELL when the close moved at least ``min_move_points`` that way,
else HOLD).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from trader.errors import JournalError
from trader.journal import reader


def export_dataset(
    journal: Path, out: Path, run_id: str | None = None, horizon: int = 15, min_move_points: float = 5.0
) -> int:
    if not journal.exists():
        raise JournalError(f"journal not found: {journal}")
    runs = [run_id] if run_id else reader.llm_runs(journal)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with out.open("w") as fh:
        for rid in runs:
            closes = reader.decision_closes(journal, rid)
            if not closes:
                continue
            idx = np.array(sorted(closes))
            px = np.array([closes[i] for i in idx])
            for (
                qid,
                bar,
                ts,
                trigger,
                system,
                user,
                raw,
                action,
                stated,
                logit,
                probs,
                latency,
                error,
            ) in reader.answered_queries(journal, rid):
                pos = int(np.searchsorted(idx, bar))
                if pos >= len(idx) or idx[pos] != bar or pos + horizon >= len(idx):
                    continue  # no full outcome window
                path = px[pos + 1 : pos + horizon + 1] - px[pos]
                change = float(path[-1])
                best = (
                    "BUY" if change >= min_move_points else "SELL" if change <= -min_move_points else "HOLD"
                )
                fh.write(
                    json.dumps(
                        {
                            "run_id": rid,
                            "query_id": qid,
                            "bar_index": bar,
                            "ts_ns": ts,
                            "trigger": trigger,
                            "messages": [
                                {"role": "system", "content": system},
                                {"role": "user", "content": user},
                            ],
                            "answer": raw,
                            "parsed_action": action,
                            "stated_confidence": stated,
                            "logit_confidence": logit,
                            "action_probs": json.loads(probs) if probs else None,
                            "latency_ms": latency,
                            "error": error,
                            "outcome": {
                                "horizon_bars": horizon,
                                "change_points": round(change, 4),
                                "max_up_points": round(float(path.max()), 4),
                                "max_down_points": round(float(path.min()), 4),
                                "hindsight_action": best,
                            },
                        }
                    )
                    + "\n"
                )
                n += 1
    return n
