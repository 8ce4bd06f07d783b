"""The personal-rag policy pack (CrossGuard): every policy in rag_policies, mandatory."""

from pulumi_policy import EnforcementLevel, PolicyPack
from rag_policies import POLICIES

PolicyPack(
    name="personal-rag-invariants",
    enforcement_level=EnforcementLevel.MANDATORY,
    policies=list(POLICIES),
)
