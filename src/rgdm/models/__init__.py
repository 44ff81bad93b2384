"""rgdm.models"""
