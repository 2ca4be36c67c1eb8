"""The pipeline's topics and their partition counts.

Its own module, free of Faust and the detectors, so that processes which only
administer topics (``deepwatch replay`` before it starts its workers, the
broker command) do not import the whole pipeline first.
"""

from __future__ import annotations

from streams.broker import TopicSpec
from streams.settings import Settings

CLUSTER_TABLE = "clusters"
ANALYZE_GROUP_SUFFIX = "-analyze"  # the analyze role's consumer group (streams.app): the app id plus this
# Worker roles that run pipeline stages: every stage, or its two halves
# (streams.app.build_pipeline_app); ``detect`` is the other role.
PIPELINE_ROLES = ("pipeline", "analyze", "cluster")
ROLES = (*PIPELINE_ROLES, "detect")


def topic_specs(settings: Settings) -> list[TopicSpec]:
    p = settings.partitions
    t = settings.topic
    return [
        TopicSpec(t("events"), p),
        TopicSpec(t("dead-letters"), p),
        TopicSpec(t("cluster-ops"), 1, single_writer=True),  # the single ordered place where clusters are decided
        TopicSpec(t("detect-requests"), p),
        TopicSpec(t("cluster-updates"), p),
        TopicSpec(t("alerts"), p),
        # the cluster table's one partition, written by that single writer
        TopicSpec(f"{settings.app_id}-{CLUSTER_TABLE}-changelog", 1, compacted=True, single_writer=True),
        TopicSpec(f"{settings.app_id}-__assignor-__leader", 1),
        TopicSpec(f"{settings.app_id}-detect-__assignor-__leader", 1),
        TopicSpec(f"{settings.app_id}{ANALYZE_GROUP_SUFFIX}-__assignor-__leader", 1),
    ]
