"""Example plug-ins, loaded by dotted path from config (``module:attr``).

fusion.RegimeAwareFusion        fusion.strategy = "strategies.fusion:RegimeAwareFusion"
risk_rules.HighVix              risk.rules = ["strategies.risk_rules:HighVix"]
risk_rules.NearSupportResistance
risk_rules.LunchBlock
features.RunRangeBlock    features.custom_blocks = ["strategies.features:RunRangeBlock"]
"""
