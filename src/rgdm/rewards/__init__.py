"""rgdm.rewards"""
