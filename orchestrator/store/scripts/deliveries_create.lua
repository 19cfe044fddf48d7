-- Record new webhook deliveries, each unless one with its id exists.
-- KEYS: 1 webhook due, 2.. deliveries; ARGV per delivery: JSON, due score (ms), id, endpoint index key or ''
local created = {}
for i = 2, #KEYS do
  local a = (i - 2) * 4
  if redis.call('SET', KEYS[i], ARGV[a + 1], 'NX') then
    redis.call('ZADD', KEYS[1], ARGV[a + 2], ARGV[a + 3])
    if ARGV[a + 4] ~= '' then
      redis.call('ZADD', ARGV[a + 4], 0, ARGV[a + 3])
      redis.call('ZADD', ARGV[a + 4] .. ':pending', 0, ARGV[a + 3])
    end
    created[#created + 1] = 1
  else
    created[#created + 1] = 0
  end
end
return created
