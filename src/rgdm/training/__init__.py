"""rgdm.training"""
