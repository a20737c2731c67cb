"""The endpoint instance types the project deploys to, with their on-demand prices.

Declared here, once: `deploy` offers exactly these (`--instance-type`, checked before any AWS
call) and the studio prices its images with them (an estimate: measured seconds per image x
the hourly price). Here rather than in deploy/config.py because the studio's Docker image
carries sdserve but not deploy.

Prices are Amazon SageMaker real-time inference on-demand prices in us-east-1, USD per instance
hour, as AWS listed them (aws.amazon.com/sagemaker/pricing); other regions and savings plans
differ, so the studio takes a price of its own (`--price-per-hour`) where these do not fit.

Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass

PRICES_REGION = "us-east-1"


@dataclass(frozen=True)
class InstanceType:
    name: str
    usd_per_hour: float  # on-demand, PRICES_REGION
    gpu: str | None  # the accelerator; None for a CPU instance (the KIND_GPU configs need one)


INSTANCE_TYPES: dict[str, InstanceType] = {
    instance.name: instance
    for instance in (
        InstanceType("ml.g4dn.xlarge", 0.7364, "NVIDIA T4 16 GB"),
        InstanceType("ml.g4dn.2xlarge", 0.94, "NVIDIA T4 16 GB"),
        InstanceType("ml.g5.xlarge", 1.408, "NVIDIA A10G 24 GB"),
        InstanceType("ml.g5.2xlarge", 1.515, "NVIDIA A10G 24 GB"),
        InstanceType("ml.g5.4xlarge", 2.03, "NVIDIA A10G 24 GB"),
        InstanceType("ml.c5.xlarge", 0.204, None),
    )
}
# A g5: 24 GB holds the four SD 2 models in fp16 at once, so the MME rarely evicts.
DEFAULT_INSTANCE_TYPE = "ml.g5.2xlarge"
