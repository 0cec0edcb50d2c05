//! The catalog: public model names → channels (plugin, base URL, credential), and the choice of
//! the channel and plugin that serve one request.
//!
//! The catalog is rebuilt from config when `config.yaml` changes and swapped atomically; a request
//! holds its `Route` (and through it its `Channel`) for its whole life.

pub mod health;

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::{ChannelConfig, RoutesConfig, Secret};
use crate::plugins::{ChannelContext, Plugin, Registry};

#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("The model `{0}` does not exist or you do not have access to it.")]
    UnknownModel(String),
    #[error("the provider plugin `{plugin}` serving model `{model}` is not loaded")]
    PluginNotLoaded { model: String, plugin: String },
    #[error(
        "the model `{0}` has no price: the operator must give it one (or mark it `free: true`)"
    )]
    Unpriced(String),
}

/// A configured upstream: a plugin, where it sends, and the credential the host adds.
#[derive(Debug)]
pub struct Channel {
    pub name: String,
    pub plugin: String,
    pub base_url: String,
    pub credential: Option<Secret>,
    pub options: Vec<(String, String)>,
}

/// One public model name and what serves it.
#[derive(Debug, Clone)]
pub struct Route {
    pub model: String,
    pub upstream_model: String,
    pub channel: Arc<Channel>,
    /// The configured price, if any (else the plugin manifest's).
    pub price: Option<crate::billing::Price>,
    /// Marked free in config: billed nothing.
    pub free: bool,
    /// Callable with no key (`auth.anonymous_models`): unbilled.
    pub anonymous: bool,
    /// Async tasks of this model time out after this long (`None`: `tasks.deadline`).
    pub task_deadline: Option<std::time::Duration>,
    /// How this model's prompts are counted for the estimate.
    pub tokenizer: crate::config::Tokenizer,
}

impl Route {
    /// The price billed for this model: the configured one, else nothing for a model marked
    /// free, else the one the serving plugin's manifest declares for the upstream model; `None`
    /// if none says (such a model is never billed as free: keyed calls to it are refused).
    pub fn price_with(&self, plugin: Option<&Plugin>) -> Option<crate::billing::Price> {
        if self.free {
            return Some(crate::billing::Price::default());
        }
        self.price
            .or_else(|| self.model_info(plugin?).and_then(|m| m.price))
    }

    /// What a plugin's manifest says about this route's upstream model.
    pub fn model_info<'p>(&self, plugin: &'p Plugin) -> Option<&'p crate::plugins::ModelInfo> {
        plugin
            .manifest
            .models
            .iter()
            .find(|m| m.id == self.upstream_model)
    }

    /// What the plugin is told about the channel: never the credential.
    pub fn context(&self) -> ChannelContext {
        ChannelContext {
            channel: self.channel.name.clone(),
            base_url: self.channel.base_url.clone(),
            model: self.upstream_model.clone(),
            options: self.channel.options.clone(),
        }
    }
}

/// The plugin chosen for a request, held for the request's whole life.
pub struct Pick {
    pub route: Route,
    pub plugin: Arc<Plugin>,
    /// The model's other channels, in the order to fail over to them.
    pub alternates: Vec<(Route, Arc<Plugin>)>,
}

impl Pick {
    /// The model's price as billed (see [`Route::price_with`]).
    pub fn price(&self) -> Result<crate::billing::Price, RoutingError> {
        self.route
            .price_with(Some(&self.plugin))
            .ok_or_else(|| RoutingError::Unpriced(self.route.model.clone()))
    }

    /// What the plugin's manifest says about the upstream model.
    pub fn model_info(&self) -> Option<&crate::plugins::ModelInfo> {
        self.route.model_info(&self.plugin)
    }
}

/// One channel serving a model, with its share and rank.
#[derive(Debug, Clone)]
struct Member {
    route: Route,
    weight: u32,
    priority: u32,
}

#[derive(Debug, Default)]
struct Catalog {
    /// Each model's channels; the first is the one `channel:` names (the catalog's face).
    models: BTreeMap<String, Vec<Member>>,
}

pub struct Routing {
    catalog: ArcSwap<Catalog>,
    plugins: Arc<Registry>,
    health: health::Health,
}

impl Routing {
    pub fn new(routes: &RoutesConfig, plugins: Arc<Registry>) -> Self {
        Self::with_health(
            routes,
            plugins,
            health::Health::new(Default::default(), None),
        )
    }

    pub fn with_health(
        routes: &RoutesConfig,
        plugins: Arc<Registry>,
        health: health::Health,
    ) -> Self {
        Self {
            catalog: ArcSwap::from_pointee(build(routes)),
            plugins,
            health,
        }
    }

    /// The channels' breakers.
    pub fn health(&self) -> &health::Health {
        &self.health
    }

    /// Swap in a new set of channels and models.
    pub fn replace(&self, routes: &RoutesConfig) {
        self.catalog.store(Arc::new(build(routes)));
    }

    pub fn plugins(&self) -> &Arc<Registry> {
        &self.plugins
    }

    /// The channels to try for one request of `model`, in order (see [`health::order`]): the
    /// first with its plugin as the pick, the others (whose plugins are loaded) as alternates.
    pub fn pick(&self, model: &str) -> Result<Pick, RoutingError> {
        let catalog = self.catalog.load();
        let members = catalog
            .models
            .get(model)
            .ok_or_else(|| RoutingError::UnknownModel(model.to_string()))?;
        if let [only] = members.as_slice() {
            let plugin = self.plugin_for(model, &only.route)?;
            return Ok(Pick {
                route: only.route.clone(),
                plugin,
                alternates: Vec::new(),
            });
        }
        let ranked = members
            .iter()
            .map(|m| {
                let available = self.health.available(&m.route.channel.name);
                (m, m.weight, m.priority, available)
            })
            .collect();
        let mut candidates = Vec::with_capacity(members.len());
        let mut first_error = None;
        for m in health::order(ranked, |total| rand::random::<u64>() % total) {
            match self.plugin_for(model, &m.route) {
                Ok(p) => candidates.push((m.route.clone(), p)),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        let mut it = candidates.into_iter();
        let Some((route, plugin)) = it.next() else {
            return Err(
                first_error.unwrap_or_else(|| RoutingError::UnknownModel(model.to_string()))
            );
        };
        Ok(Pick {
            route,
            plugin,
            alternates: it.collect(),
        })
    }

    fn plugin_for(&self, model: &str, route: &Route) -> Result<Arc<Plugin>, RoutingError> {
        self.plugins
            .get(&route.channel.plugin)
            .ok_or_else(|| RoutingError::PluginNotLoaded {
                model: model.to_string(),
                plugin: route.channel.plugin.clone(),
            })
    }

    /// Models of `routes` that would be billed as free by accident: no configured price, not
    /// marked free, and a loaded plugin whose manifest has no price for the upstream model.
    /// (A model whose plugin is not loaded yet is checked when it is called.)
    pub fn unpriced(&self, routes: &RoutesConfig) -> Vec<String> {
        build(routes)
            .models
            .values()
            .flatten()
            .map(|m| &m.route)
            .filter(|r| {
                self.plugins
                    .get(&r.channel.plugin)
                    .is_some_and(|p| r.price_with(Some(&p)).is_none())
            })
            .map(|r| r.model.clone())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect()
    }

    /// Every public model with the plugin that would serve it now (if loaded).
    pub fn models(&self) -> Vec<(Route, Option<Arc<Plugin>>)> {
        let catalog = self.catalog.load();
        catalog
            .models
            .values()
            .filter_map(|m| m.first())
            .map(|m| (m.route.clone(), self.plugins.get(&m.route.channel.plugin)))
            .collect()
    }
}

fn build(routes: &RoutesConfig) -> Catalog {
    let channels: BTreeMap<&str, Arc<Channel>> = routes
        .channels
        .iter()
        .map(|c: &ChannelConfig| {
            (
                c.name.as_str(),
                Arc::new(Channel {
                    name: c.name.clone(),
                    plugin: c.plugin.clone(),
                    base_url: c.base_url.clone(),
                    credential: c.credential.clone(),
                    options: c
                        .options
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                }),
            )
        })
        .collect();
    let models = routes
        .models
        .iter()
        .filter_map(|m| {
            let route = |channel: Arc<Channel>, upstream_model: &str| Route {
                model: m.name.clone(),
                upstream_model: upstream_model.to_string(),
                channel,
                price: m.price,
                free: m.free,
                anonymous: routes.anonymous_models.contains(&m.name),
                task_deadline: m.task_deadline,
                tokenizer: m.tokenizer,
            };
            let mut members = vec![Member {
                route: route(channels.get(m.channel.as_str())?.clone(), &m.upstream_model),
                weight: m.weight,
                priority: m.priority,
            }];
            for c in &m.channels {
                if let Some(ch) = channels.get(c.channel.as_str()) {
                    members.push(Member {
                        route: route(ch.clone(), &c.upstream_model),
                        weight: c.weight,
                        priority: c.priority,
                    });
                }
            }
            Some((m.name.clone(), members))
        })
        .collect();
    Catalog { models }
}
