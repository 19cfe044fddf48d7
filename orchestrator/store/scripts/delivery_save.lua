-- Save a delivery that still exists (never resurrect one deleted with its endpoint), and move it
-- between the due set and its endpoint's status indexes.
-- KEYS: 1 delivery, 2 webhook due; ARGV: 1 JSON, 2 status, 3 due score (ms), 4 id, 5 endpoint index key or ''
if not redis.call('SET', KEYS[1], ARGV[1], 'XX') then return 0 end
if ARGV[2] == 'pending' then
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
else
  redis.call('ZREM', KEYS[2], ARGV[4])
end
if ARGV[5] ~= '' and redis.call('EXISTS', ARGV[5]) == 1 then
  for _, s in ipairs({'pending', 'delivered', 'dead'}) do
    if s == ARGV[2] then
      redis.call('ZADD', ARGV[5] .. ':' .. s, 0, ARGV[4])
    else
      redis.call('ZREM', ARGV[5] .. ':' .. s, ARGV[4])
    end
  end
end
return 1
