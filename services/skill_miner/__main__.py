"""``python -m services.skill_miner``: one skill-miner process (run a few to scale out).

Deduplication uses the gateway's embedding model when it is installed (``dedupe_similarity``).
With ``enable_skill_evolution`` off it consumes nothing (``scored`` entries wait for a
miner that is enabled) and only serves ``/metrics`` until SIGTERM, so a deployment can
list the service and switch it on by configuration.
"""

from __future__ import annotations

import asyncio
import logging

from services.skill_miner.metrics import MinerMetrics
from services.skill_miner.service import SkillMiner
from services.skill_miner.similarity import Similarity, embedding_similarity, lexical_similarity
from shared.keys import GROUP_SKILL_MINER, SCORED
from shared.logs import setup_logging
from shared.redis_client import connect
from shared.settings import Settings
from shared.skill_index import Embedder, embedding_available
from shared.worker import Consumer, run_workers

log = logging.getLogger("reef.skill_miner")


async def _idle(stopping: asyncio.Event) -> None:
    await stopping.wait()


async def serve(settings: Settings) -> None:
    """Consume ``scored`` until SIGTERM (or only wait for it, when evolution is off)."""
    metrics = MinerMetrics.create()
    client = connect(settings)
    if not settings.enable_skill_evolution:
        log.info("skill_miner.disabled", extra={"setting": "enable_skill_evolution"})
        try:
            await run_workers(settings, [], registry=metrics.registry, client=client,
                              background=[_idle])
        finally:
            await client.aclose()
        return
    similarity = await asyncio.to_thread(dedupe_similarity, settings)
    miner = SkillMiner(settings, client, metrics, similarity=similarity)
    await miner.start()
    try:
        await run_workers(settings, [Consumer(SCORED, GROUP_SKILL_MINER, miner.on_scored)],
                          registry=metrics.registry, client=client)
    finally:
        await miner.close()
        await client.aclose()


def dedupe_similarity(settings: Settings) -> Similarity:
    """all-MiniLM-L6-v2 (the gateway's retrieval model, what ``skill_merge_similarity`` is
    tuned for) when retrieval uses embeddings and the ``skills`` extra is installed; else
    the lexical measure, which merges only near-identical wording."""
    if settings.retrieval_mode == "embedding" and embedding_available():
        return embedding_similarity(Embedder())
    log.info("skill_miner.lexical_dedupe", extra={"retrieval_mode": settings.retrieval_mode})
    return lexical_similarity


def main() -> None:
    settings = Settings()
    setup_logging(settings.log_level)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
