"""docs/policies.md shows real `explain` output: each block under an ``<!-- explain: ... -->``
marker is what the engine prints for that case, with the shipped policies plus the doc's own site
policy. Run with CWSNET_REGEN_DOCS=1 to rewrite the blocks after a change."""

from __future__ import annotations

import os
import re
from pathlib import Path

from cwsnet.cli_policy import _data_decisions
from cwsnet.policy import AccessEngine, Subject, load_policies

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "policies.md"
MARK = re.compile(r"(<!-- explain: (.+?) -->\n```text\n)(.*?)(```)", re.S)
#: the whole `cwsnet policy explain --topic` output for a node's own uplink topic (access, routing, qos)
TOPIC = re.compile(r"(<!-- explain-topic: (.+?) -->\n```text\n)(.*?)(```)", re.S)


def render(doc: str, tmp: Path) -> str:
    site = re.search(r"<!-- site-policy -->\n```yaml\n(.*?)```", doc, re.S)
    assert site, "docs/policies.md lost its site policy block"
    (tmp / "site.yaml").write_text(site.group(1))
    pset = load_policies([ROOT / "policies", tmp])
    engine = AccessEngine(pset)

    def clean(text: str) -> str:
        return text.replace(str(ROOT) + "/", "").replace(str(tmp), "{data-dir}/policies")

    def block(m: re.Match) -> str:
        role, node, site_name, action, topic, *broker = m.group(2).split()
        d = engine.decide(Subject(node, role, site_name), action, topic, broker[0] if broker else None)
        return m.group(1) + clean(d.explain()) + "\n" + m.group(4)

    def topic_block(m: re.Match) -> str:
        role, node, site_name, topic = m.group(2).split()
        subject = Subject(node, role, site_name)
        out = [engine.decide(subject, "publish", topic).explain(), *_data_decisions(pset, subject, topic)]
        return m.group(1) + clean("\n\n".join(out)) + "\n" + m.group(4)

    return TOPIC.sub(topic_block, MARK.sub(block, doc))


def test_the_explain_examples_in_the_docs_are_what_the_engine_says(tmp_path: Path) -> None:
    doc = DOC.read_text()
    want = render(doc, tmp_path)
    assert len(MARK.findall(doc)) >= 5 and len(TOPIC.findall(doc)) >= 2
    if os.environ.get("CWSNET_REGEN_DOCS"):
        DOC.write_text(want)
    assert doc == want, "docs/policies.md is out of step with the engine: rerun with CWSNET_REGEN_DOCS=1"
