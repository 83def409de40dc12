"""switch.merchant: merchant services (issue 6); see docs/merchant.md."""
