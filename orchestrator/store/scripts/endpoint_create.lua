-- Create a webhook endpoint unless the tenant has too many.
-- KEYS: 1 the tenant's endpoints hash; ARGV: 1 id, 2 JSON, 3 the most a tenant may have
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
