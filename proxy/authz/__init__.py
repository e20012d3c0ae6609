"""Authorization: route table, path normalization and policy decisions."""
