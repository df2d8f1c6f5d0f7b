"""One module per job type, each a Prefect @flow."""
