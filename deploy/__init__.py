"""AWS only: the provisioning CLI (`python -m deploy`): archives uploaded, resources, IAM policies."""
