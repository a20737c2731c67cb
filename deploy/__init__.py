"""Model archives, the AWS provisioning CLI (`python -m deploy`) and the local endpoint."""
