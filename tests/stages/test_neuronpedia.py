"""Neuronpedia client, cache and feature selection, against a local HTTP server.

The server (http.server on 127.0.0.1, a free port) answers `/api/feature/...` with the payloads in
tests/data/neuronpedia/ and a 404 for anything else, unless a test scripts other replies for a path
(429, 500, a hang, broken JSON). `NEURONPEDIA_API_URL` points the code at it. The client's sleep is
a recorder, so no test waits on a backoff; one `network` test checks the parser on the live site.
"""

from __future__ import annotations

import copy
import json
import logging
import socket
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.artifacts import DOCUMENTED_FEATURES
from pipeline.core.errors import UserError
from pipeline.core.params.config import parse_params
from pipeline.core.plan.layers import plan_layers
from pipeline.core.plan.record import ModelRecord
from pipeline.sources.neuronpedia import (
    MIN_EXPLANATION_SCORE,
    candidates,
    choose_from_neuronpedia,
    documented_indices,
    rejection,
)
from pipeline.sources.neuronpedia_client import (
    DEFAULT_API_URL,
    NeuronpediaClient,
    _retry_after_s,
    parse_feature,
    split_neuronpedia_id,
)
from tests.neuronpedia_standin import PAYLOADS, FakeNeuronpedia, Reply

ROOT = Path(__file__).resolve().parents[2]

# Outcomes of the payloads in tests/data/neuronpedia/gpt2-small/4-res-jb (resid_post layer 3).
GOOD_4 = {1362, 7023, 14801, 19488, 23123}
BAD_4 = {6874: "no explanation", 10417: "frac_nonzero outside", 10462: "explanation score below",
         14748: "no positive maxActApprox", 15105: "not on Neuronpedia (404)"}
# 12-res-jb (resid_post layer 11) has no documented features; the fake SAE there has d_sae 6.
GOOD_12 = {0, 2, 4}
D_SAE_11 = 6


class Sleeps(list):
    """Stands in for time.sleep: records the waits instead of waiting."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def never_sleep(seconds: float) -> None:
    raise AssertionError(f"the client tried to wait {seconds} s: it should not have sent a request")


@pytest.fixture
def server(monkeypatch):
    fake = FakeNeuronpedia()
    monkeypatch.setenv("NEURONPEDIA_API_URL", fake.url)
    for var in ("NO_PROXY", "no_proxy"):  # a user's proxy settings must not capture the local server
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    yield fake
    fake.stop()


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def client(server, tmp_path, sleeps) -> NeuronpediaClient:  # noqa: ARG001 - server sets the URL
    return NeuronpediaClient(cache_dir=tmp_path / "cache", sleep=sleeps)


def api_path(source: str, index: int) -> str:
    return f"/api/feature/gpt2-small/{source}/{index}"


def payload(source: str, index: int) -> dict:
    return json.loads((PAYLOADS / "gpt2-small" / source / f"{index}.json").read_text(encoding="utf-8"))


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens any more: connection refused at once


# ---- a study setup without weights: a fake data/model.json and a small documented list ----------

def fake_record(neuronpedia: dict[int, str | None] | None = None) -> ModelRecord:
    neuronpedia = neuronpedia or {3: "gpt2-small/4-res-jb", 11: "gpt2-small/12-res-jb"}
    layers = [{"layer": layer, "hook": f"blocks.{layer}.hook_resid_post", "resume_at": layer + 1,
               "sae_release": "gpt2-small-res-jb", "sae_id": f"blocks.{layer + 1}.hook_resid_pre",
               "neuronpedia": np_id, "d_sae": D_SAE_11 if layer == 11 else 24576}
              for layer, np_id in neuronpedia.items()]
    model = {"name": "gpt2-small", "source": "hub", "n_layers": 12, "d_model": 768, "n_ctx": 1024, "d_vocab": 50257}
    return ModelRecord.from_dict({"preset": "gpt2-small", "sae_release": "gpt2-small-res-jb", "hook": "resid_post",
                                  "model": model, "tokenizer": {"type": "hf", "name": "gpt2"}, "layers": layers})


def study(**overrides):
    raw = {"layers": [3, 11], "features_per_layer": 2, "seed": 1234, "neuronpedia_max_fetch": 10, **overrides}
    return parse_params(raw)


@pytest.fixture
def documented(tmp_path) -> Path:
    """The documented list's format, with rows for 4-res-jb only (and one for another source)."""
    path = tmp_path / "documented.csv"
    rows = ["neuronpedia_layer,sae_id,feature,label,source"]
    rows += [f"4,blocks.4.hook_resid_pre,{i},label {i},test" for i in sorted(GOOD_4 | set(BAD_4))]
    rows.append("10,blocks.10.hook_resid_pre,16899,cats,test")
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def choose(config, documented: Path, client: NeuronpediaClient, model_record: ModelRecord | None = None):
    return choose_from_neuronpedia(config, model_record or fake_record(), client=client, documented_csv=documented)


# ---- the client -----------------------------------------------------------------------------------

def test_a_feature_is_fetched_validated_and_cached(client, server, tmp_path):
    f = client.feature("gpt2-small", "4-res-jb", 14801)
    assert (f.model_id, f.source, f.index) == ("gpt2-small", "4-res-jb", 14801)
    assert f.frac_nonzero == pytest.approx(0.0042) and f.max_act == pytest.approx(12.9)
    assert f.best_explanation.description == "parts of web addresses (URLs)"  # leading space stripped
    assert f.best_explanation.score == pytest.approx((0.81 + 0.77) / 2)
    assert f.pos_tokens[0] == (" Smith", 1.41) and f.neg_tokens[0] == (" itself", -0.91)
    assert server.requests == [api_path("4-res-jb", 14801)]
    entry = json.loads((tmp_path / "cache/gpt2-small/4-res-jb/14801.json").read_text(encoding="utf-8"))
    assert entry["status"] == 200 and entry["url"] == f"{server.url}{api_path('4-res-jb', 14801)}"
    assert entry["response"] == payload("4-res-jb", 14801)  # the whole response, as received
    assert client.feature("gpt2-small", "4-res-jb", 14801) == f
    assert len(server.requests) == 1 and client.cache_hits == 1


def test_a_429_is_retried_after_the_servers_retry_after(client, server, sleeps):
    server.script(api_path("4-res-jb", 1362), Reply(429, b'{"error":"rate limited"}', {"Retry-After": "7"}))
    assert client.feature("gpt2-small", "4-res-jb", 1362).index == 1362
    assert sleeps == [7.0]
    assert server.requests == [api_path("4-res-jb", 1362)] * 2


def test_a_retry_after_beyond_the_limit_fails_at_once(client, server, sleeps):
    server.script(api_path("4-res-jb", 1362), Reply(429, b"{}", {"Retry-After": "3600"}))
    with pytest.raises(UserError, match=r"answered HTTP 429 .* Retry-After 3600 s; Neuronpedia's rate limit"):
        client.feature("gpt2-small", "4-res-jb", 1362)
    assert sleeps == [] and len(server.requests) == 1


def test_retry_after_reads_seconds_and_http_dates():
    assert _retry_after_s("12") == 12.0
    soon = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 20 < _retry_after_s(soon) <= 30
    assert _retry_after_s(None) is None and _retry_after_s("soon") is None


def test_a_500_three_times_is_one_error_naming_the_url_and_status(client, server, sleeps, tmp_path):
    path = api_path("4-res-jb", 1362)
    server.script(path, *[Reply(500, b"Internal Server Error", {"Content-Type": "text/plain"})] * 3)
    with pytest.raises(UserError) as err:
        client.feature("gpt2-small", "4-res-jb", 1362)
    message = str(err.value)
    assert f"{server.url}{path}: HTTP 500 Internal Server Error on all 3 tries" in message
    assert "\n" not in message
    assert sleeps == [1.0, 2.0]  # exponential backoff, never actually waited
    assert server.requests == [path] * 3
    assert not (tmp_path / "cache/gpt2-small/4-res-jb/1362.json").exists()


def test_a_5xx_then_success_is_retried(client, server, sleeps):
    server.script(api_path("4-res-jb", 1362), Reply(503, b""), Reply(502, b""))
    assert client.feature("gpt2-small", "4-res-jb", 1362) is not None
    assert sleeps == [1.0, 2.0]


def test_a_timeout_is_retried_then_reported(server, tmp_path, sleeps):
    client = NeuronpediaClient(cache_dir=tmp_path / "cache", sleep=sleeps, timeout=(2.0, 0.05))
    path = api_path("4-res-jb", 1362)
    server.script(path, Reply(hang=True), Reply())
    assert client.feature("gpt2-small", "4-res-jb", 1362).index == 1362  # one timeout, then an answer
    assert sleeps == [1.0]
    server.script(api_path("4-res-jb", 7023), *[Reply(hang=True)] * 3)
    with pytest.raises(UserError, match=r"/api/feature/gpt2-small/4-res-jb/7023: timed out .* on all 3 tries; "
                                        r"with no network, copy data/neuronpedia_cache/"):
        client.feature("gpt2-small", "4-res-jb", 7023)


def test_a_404_is_none_and_cached_so_it_is_not_asked_again(client, server, tmp_path):
    assert client.feature("gpt2-small", "4-res-jb", 15105) is None
    entry = json.loads((tmp_path / "cache/gpt2-small/4-res-jb/15105.json").read_text(encoding="utf-8"))
    assert entry["status"] == 404
    assert client.feature("gpt2-small", "4-res-jb", 15105) is None
    assert len(server.requests) == 1


def test_an_html_404_is_a_wrong_url_not_a_missing_feature(client, server, tmp_path):
    server.script(api_path("4-res-jb", 1362), Reply(404, b"<html>404</html>", {"Content-Type": "text/html"}))
    with pytest.raises(UserError, match=r"answered HTTP 404 with a non-JSON page.*check NEURONPEDIA_API_URL"):
        client.feature("gpt2-small", "4-res-jb", 1362)
    assert not (tmp_path / "cache/gpt2-small/4-res-jb/1362.json").exists()  # not cached as "no such feature"


def test_another_client_error_is_not_retried(client, server, sleeps):
    server.script(api_path("4-res-jb", 1362), Reply(403, b'{"error":"private"}'))
    with pytest.raises(UserError, match=r"4-res-jb/1362 answered HTTP 403 Forbidden; check the model id"):
        client.feature("gpt2-small", "4-res-jb", 1362)
    assert sleeps == []


def test_malformed_json_is_one_error_naming_the_url(client, server, tmp_path):
    path = api_path("4-res-jb", 1362)
    server.script(path, Reply(200, b'{"modelId": "gpt2-small", "layer": '))
    with pytest.raises(UserError, match=rf"{server.url}{path}: the response is not valid JSON \(JSONDecodeError"):
        client.feature("gpt2-small", "4-res-jb", 1362)
    assert not (tmp_path / "cache/gpt2-small/4-res-jb/1362.json").exists()


def _drop_description(p):
    del p["explanations"][0]["description"]


def _short_pos_values(p):
    p["pos_values"] = p["pos_values"][:-1]


@pytest.mark.parametrize(("change", "match"), [
    (lambda p: p.update(index=1362), r"field 'index' is 1362 \(int\); expected a string"),
    (lambda p: p.update(index="1363"), r"field 'index' is '1363' but '1362' was requested"),
    (lambda p: p.update(layer="5-res-jb"), r"field 'layer' is '5-res-jb' but '4-res-jb' was requested"),
    (lambda p: p.pop("frac_nonzero"), r"field 'frac_nonzero' is missing"),
    (lambda p: p.update(frac_nonzero="0.001"), r"field 'frac_nonzero' is '0.001' \(str\); expected a finite number"),
    (lambda p: p.update(frac_nonzero=3.0), r"field 'frac_nonzero' is 3.0; expected a fraction in \[0, 1\]"),
    (lambda p: p.update(maxActApprox="big"), r"field 'maxActApprox' is 'big'"),
    (lambda p: p.update(explanations={"description": "x"}), r"field 'explanations' is dict; expected a list"),
    (_drop_description, r"field 'explanations\[0\].description' is missing"),
    (lambda p: p["explanations"][0].update(scores=[{"value": None}]), r"'explanations\[0\].scores\[0\].value' is None"),
    (_short_pos_values, r"field 'pos_str' has 12 entries but 'pos_values' has 11"),
    (lambda p: p["neg_str"].__setitem__(0, 5), r"field 'neg_str\[0\]' is 5 \(int\)"),
])
def test_an_unexpected_payload_names_the_field(client, server, tmp_path, change, match):
    body = copy.deepcopy(payload("4-res-jb", 1362))
    change(body)
    server.script(api_path("4-res-jb", 1362), Reply(200, json.dumps(body).encode()))
    with pytest.raises(UserError, match=match) as err:
        client.feature("gpt2-small", "4-res-jb", 1362)
    assert str(err.value).startswith(f"{server.url}{api_path('4-res-jb', 1362)}: ")
    assert not (tmp_path / "cache/gpt2-small/4-res-jb/1362.json").exists()  # only usable payloads are cached


def test_cache_writes_are_atomic(client, tmp_path, monkeypatch):
    real_write_text = Path.write_text

    def write_half_then_fail(self, data, *args, **kwargs):
        real_write_text(self, data[: len(data) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", write_half_then_fail)
    with pytest.raises(UserError, match=r"could not write the Neuronpedia cache entry .*1362.json .*No space left"):
        client.feature("gpt2-small", "4-res-jb", 1362)
    cache = tmp_path / "cache/gpt2-small/4-res-jb"
    assert [p.name for p in cache.iterdir()] == []  # neither a half file nor its temporary
    monkeypatch.undo()
    assert client.feature("gpt2-small", "4-res-jb", 1362) is not None
    assert json.loads((cache / "1362.json").read_text(encoding="utf-8"))["status"] == 200


def test_an_unreadable_cache_entry_is_named_with_its_remedy(client, tmp_path):
    path = tmp_path / "cache/gpt2-small/4-res-jb/1362.json"
    path.parent.mkdir(parents=True)
    path.write_text('{"status": 200, "resp', encoding="utf-8")
    with pytest.raises(UserError, match=r"1362.json is not a readable cache entry .*delete it to fetch again"):
        client.feature("gpt2-small", "4-res-jb", 1362)


def test_a_bad_base_url_is_refused(monkeypatch):
    monkeypatch.setenv("NEURONPEDIA_API_URL", "www.neuronpedia.org")
    with pytest.raises(UserError, match="NEURONPEDIA_API_URL is 'www.neuronpedia.org'; it needs an http"):
        NeuronpediaClient()


# ---- resid_post layers -> Neuronpedia sources ------------------------------------------------------

def test_resid_post_layers_map_to_neuronpedia_sources_1_to_12(monkeypatch):
    monkeypatch.delenv("NEURONPEDIA_API_URL", raising=False)
    client = NeuronpediaClient(sleep=never_sleep)
    plans = plan_layers(parse_params({"layers": list(range(12))}))
    assert [split_neuronpedia_id(p.neuronpedia) for p in plans] == [("gpt2-small", f"{n}-res-jb") for n in range(1, 13)]
    assert client.url(*split_neuronpedia_id(plans[9].neuronpedia), 16899) == \
        "https://www.neuronpedia.org/api/feature/gpt2-small/10-res-jb/16899"
    assert plans[11].neuronpedia_url(5) == "https://www.neuronpedia.org/gpt2-small/12-res-jb/5"
    # The repository's documented list covers 1-res-jb..11-res-jb; 12-res-jb (resid_post 11) has none.
    counts = [len(documented_indices(ROOT / DOCUMENTED_FEATURES, p.neuronpedia, 24576)) for p in plans]
    assert all(n > 0 for n in counts[:11]) and counts[11] == 0
    assert 1362 in documented_indices(ROOT / DOCUMENTED_FEATURES, plans[3].neuronpedia, 24576)
    assert 16899 in documented_indices(ROOT / DOCUMENTED_FEATURES, plans[9].neuronpedia, 24576)


def test_a_neuronpedia_id_needs_model_and_source():
    with pytest.raises(UserError, match="not of the form MODEL/SOURCE"):
        split_neuronpedia_id("4-res-jb")


# ---- selection --------------------------------------------------------------------------------------

def test_selection_chooses_interpretable_features_and_says_why(client, documented):
    rows = choose(study(), documented, client)
    assert [r.layer for r in rows] == [3, 3, 11, 11]
    for r in rows:
        good = GOOD_4 if r.layer == 3 else GOOD_12
        assert r.feature in good and r.source == "neuronpedia"
        src = "4-res-jb" if r.layer == 3 else "12-res-jb"
        p = payload(src, r.feature)
        assert r.label == p["explanations"][0]["description"].strip()
        assert (r.density, r.max_act) == (p["frac_nonzero"], p["maxActApprox"])
        assert r.neuronpedia_url == f"https://www.neuronpedia.org/gpt2-small/{src}/{r.feature}"
        pos, neg = json.loads(r.np_pos_tokens), json.loads(r.np_neg_tokens)
        assert len(pos) == len(neg) == 10  # the payloads have 12; the top 10 are kept
        assert pos[0] == [" Smith", 1.41] and neg[0] == [" itself", -0.91]
        assert "frac_nonzero" in r.reason and "explanation by gpt-4o-mini" in r.reason
        assert ("documented in documented.csv (row" if r.layer == 3 else "random index (seeded") in r.reason
    assert len({r.feature for r in rows if r.layer == 3}) == 2


def test_each_rejection_has_its_reason():
    for index, why in BAD_4.items():
        feature = None if index == 15105 else parse_feature(payload("4-res-jb", index), "gpt2-small", "4-res-jb",
                                                             index, "test")
        assert rejection(feature, 1e-4, 0.05).startswith(why), index
    assert MIN_EXPLANATION_SCORE > max(0.31, 0.22)  # 10462's scores
    for index in GOOD_4:
        assert rejection(parse_feature(payload("4-res-jb", index), "gpt2-small", "4-res-jb", index, "t"),
                         1e-4, 0.05) is None


def test_a_404_feature_is_skipped_logged_and_another_chosen(client, server, documented, caplog):
    config = study(layers=[3], features_per_layer=2)
    order = [c.index for c in candidates(documented_indices(documented, "gpt2-small/4-res-jb", 24576), 24576,
                                         np.random.default_rng([config.seed, 3]), "documented.csv")]
    first_good = next(i for i in order if i in GOOD_4)
    server.script(api_path("4-res-jb", first_good), Reply(404, b'{"error":"Not Found"}'))
    with caplog.at_level(logging.INFO, logger="pipeline.sources.neuronpedia"):
        rows = choose(config, documented, client, fake_record({3: "gpt2-small/4-res-jb"}))
    chosen = [r.feature for r in rows]
    assert first_good not in chosen and len(chosen) == 2 and set(chosen) <= GOOD_4
    assert f"skipping gpt2-small/4-res-jb/{first_good}: not on Neuronpedia (HTTP 404)" in caplog.text


def test_a_rerun_from_the_cache_makes_no_request_and_gives_the_same_rows(server, documented, tmp_path,
                                                                         monkeypatch, sleeps):
    monkeypatch.chdir(tmp_path)  # the default cache, data/neuronpedia_cache, is relative to the project root
    first = choose(study(), documented, NeuronpediaClient(sleep=sleeps))
    assert (tmp_path / "data/neuronpedia_cache/gpt2-small/12-res-jb").is_dir()
    server.stop()
    monkeypatch.setenv("NEURONPEDIA_API_URL", closed_port_url())
    offline = NeuronpediaClient(sleep=never_sleep)
    assert choose(study(), documented, offline) == first
    assert offline.requests_made == 0 and offline.cache_hits > 0
    # A fresh machine with only the cache directory copied over gives the same rows too.
    fresh = tmp_path / "fresh"
    (fresh / "data").mkdir(parents=True)
    (tmp_path / "data/neuronpedia_cache").rename(fresh / "data/neuronpedia_cache")
    monkeypatch.chdir(fresh)
    assert choose(study(), documented, NeuronpediaClient(sleep=never_sleep)) == first


def test_offline_without_the_cache_is_one_line_naming_the_url_and_remedy(tmp_path, monkeypatch, documented, sleeps):
    url = closed_port_url()
    monkeypatch.setenv("NEURONPEDIA_API_URL", url)
    with pytest.raises(UserError) as err:
        choose(study(), documented, NeuronpediaClient(cache_dir=tmp_path / "cache", sleep=sleeps))
    message = str(err.value)
    assert message.startswith(f"{url}/api/feature/gpt2-small/4-res-jb/") and "\n" not in message
    assert "could not connect" in message and "on all 3 tries" in message
    assert "copy data/neuronpedia_cache/ from a run that had one" in message and "csv or auto" in message
    assert sleeps == [1.0, 2.0]


@pytest.mark.usefixtures("server")
def test_selection_is_deterministic_given_the_seed(documented, tmp_path, sleeps):
    def run(seed: int, cache: str):
        client = NeuronpediaClient(cache_dir=tmp_path / cache, sleep=sleeps)
        return [(r.layer, r.feature) for r in choose(study(seed=seed), documented, client)]

    assert run(1234, "a") == run(1234, "b")
    assert len({tuple(run(seed, "a")) for seed in range(6)}) > 1  # the seed does steer the choice


def test_too_few_passing_features_is_one_line_naming_layer_count_and_reasons(client, documented):
    with pytest.raises(UserError) as err:
        choose(study(layers=[11], features_per_layer=4), documented, client)
    message = str(err.value)
    assert message.startswith("layer 11 (gpt2-small/12-res-jb): only 3 of features_per_layer=4 passed after "
                              "fetching 6 candidate(s) (no candidates left); rejected: ")
    for part in ("frac_nonzero outside [0.0001, 0.05]: 1", "no explanation: 1", "not on Neuronpedia (404): 1",
                 "raise neuronpedia_max_fetch"):
        assert part in message
    with pytest.raises(UserError, match=r"layer 3 \(gpt2-small/4-res-jb\): only \d of features_per_layer=5 passed "
                                        r"after fetching 3 candidate\(s\) \(neuronpedia_max_fetch=3\)"):
        choose(study(layers=[3], features_per_layer=5, neuronpedia_max_fetch=3), documented, client)


def test_layers_without_enough_documented_features_continue_with_random_indices(client, server, documented):
    rows = choose(study(layers=[11], features_per_layer=3), documented, client)
    assert {r.feature for r in rows} == GOOD_12
    assert len(server.requests) <= D_SAE_11


def test_an_sae_without_a_neuronpedia_source_is_a_clear_error(client, server, documented):
    model_record = fake_record({3: "gpt2-small/4-res-jb", 5: None})
    with pytest.raises(UserError, match=r"layer 5: feature_source neuronpedia needs SAEs with a Neuronpedia source"
                                        r".* set feature_source to auto .* or csv"):
        choose(study(layers=[3, 5]), documented, client, model_record)
    assert server.requests == []  # checked before any request


# ---- the live site ------------------------------------------------------------------------------------

@pytest.mark.network
def test_the_live_api_serves_the_schema_we_parse(tmp_path):
    try:
        socket.create_connection(("www.neuronpedia.org", 443), timeout=3).close()
    except OSError:
        pytest.skip("www.neuronpedia.org is unreachable")
    client = NeuronpediaClient(DEFAULT_API_URL, tmp_path)
    f = client.feature("gpt2-small", "10-res-jb", 16899)  # the "cats" feature (facts.md)
    assert f is not None and (f.source, f.index) == ("10-res-jb", 16899)
    assert 0 < f.frac_nonzero < 1 and f.max_act is not None and f.max_act > 0
    assert f.best_explanation is not None and any("cat" in e.description.lower() for e in f.explanations)
    assert len(f.pos_tokens) > 0 and len(f.neg_tokens) > 0
