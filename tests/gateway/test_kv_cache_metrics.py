"""/metrics names each engine's KV cache dtype and attention kernel (an info gauge), here for an
engine started with an int8 KV cache that still answers requests."""

from __future__ import annotations

import re

import httpx
import pytest

from sagellm.control_plane import ControlPlaneManager
from sagellm.gateway import GatewaySettings
from tests.gateway.conftest import API_KEY, TINY, serve, tiny_engine_config


@pytest.fixture(scope="module")
def int8_server(tiny_checkpoint):
    cfg = tiny_engine_config(tiny_checkpoint, kv_cache_dtype="int8")
    manager = ControlPlaneManager(engine_configs=[cfg])
    st, url, _ = serve(manager, GatewaySettings(api_key=API_KEY, drain_timeout_s=5))
    with httpx.Client(
        base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120
    ) as http:
        yield manager, http
    st.stop()


def test_metrics_name_the_kv_dtype_and_kernel(int8_server):
    manager, http = int8_server
    r = http.post("/v1/completions", json={"model": TINY, "prompt": "Hi", "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3
    text = http.get("/metrics").text
    line = re.search(r"^sagellm_kv_cache_info\{(.*)\} 1\.0$", text, re.M)
    assert line, text
    labels = dict(re.findall(r'(\w+)="([^"]*)"', line[1]))
    assert labels["dtype"] == "int8" and labels["model"] == TINY
    assert labels["attention_kernel"].startswith("cpu-")
    assert labels["attention_kernel"].endswith("paged attention, int8 KV")
    info = manager.engines()[0].info()
    assert info["kv_cache_dtype"] == "int8"
    assert info["attention_kernel"] == labels["attention_kernel"]
